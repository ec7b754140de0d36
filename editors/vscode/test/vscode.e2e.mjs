// The extension in a real VS Code: code-server (VS Code for the browser, from npm) with the packaged .vsix
// installed, in Chromium driven by playwright-core. A developer opens a Python file, sees star-ls's ghost
// text, accepts it with Tab, dismisses the next one with Escape and types their own text; then `star-ls cases
// export` must hold a guard case for the first completion and a failure case for the second. Then `.env`
// is opened, and the extension must never have sent it to the server (its LSP trace shows the file opened
// after it, not it).
//
// Run by scripts/test after scripts/install-code-server and scripts/package-vscode:
//   node test/vscode.e2e.mjs
// Env: STAR_LS_BIN (the binary), STAR_LS_MODEL (the model), STAR_LS_CODE_SERVER (the directory
// install-code-server prints), STAR_LS_VSIX (the package), STAR_LS_CHROMIUM (default /usr/bin/chromium).
// Exits 0 when every check holds; otherwise prints what failed and exits 1.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

const need = (name) => process.env[name] || (console.error(`${name} is not set`), process.exit(2));
const bin = need('STAR_LS_BIN');
const model = need('STAR_LS_MODEL');
const install = need('STAR_LS_CODE_SERVER');
const vsix = need('STAR_LS_VSIX');
const chromiumPath = process.env.STAR_LS_CHROMIUM || '/usr/bin/chromium';
const { chromium } = createRequire(path.join(install, 'package.json'))('playwright-core');
const codeServer = path.join(install, 'node_modules', 'code-server', 'out', 'node', 'entry.js');

const log = (...args) => console.log('[vscode e2e]', ...args);

/** A port nothing listens on now. */
async function freePort() {
	return new Promise((resolve, reject) => {
		const s = net.createServer();
		s.once('error', reject);
		s.listen(0, '127.0.0.1', () => {
			const { port } = s.address();
			s.close(() => resolve(port));
		});
	});
}

/** Polls `cond` every 100 ms until it returns a truthy value; throws `what` after `ms`. */
async function until(what, ms, cond) {
	const deadline = Date.now() + ms;
	for (;;) {
		const v = await cond();
		if (v) {
			return v;
		}
		if (Date.now() > deadline) {
			throw new Error(`timed out after ${ms} ms waiting for ${what}`);
		}
		await new Promise((r) => setTimeout(r, 100));
	}
}

/** The extension's log (its LSP trace, verbose: every message with its params), as written so far. */
function traceLog() {
	const logs = path.join(userData, 'logs');
	const files = fs.existsSync(logs) ? fs.readdirSync(logs, { recursive: true }) : [];
	return files
		.filter((f) => f.endsWith(path.join('star-ls.star-ls', 'star-ls.log')))
		.map((f) => fs.readFileSync(path.join(logs, f), 'utf8'))
		.join('');
}

function cases(data) {
	const out = execFileSync(bin, ['cases', 'export'], { env: { ...process.env, STAR_LS_DATA_DIR: data } }).toString();
	return out
		.split('\n')
		.filter((l) => l.trim() !== '')
		.map((l) => JSON.parse(l));
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'star-ls-vscode-e2e-'));
const [ws, data, userData, extensions] = ['ws', 'data', 'user-data', 'extensions'].map((d) => path.join(dir, d));
for (const d of [ws, data, path.join(userData, 'User'), extensions]) {
	fs.mkdirSync(d, { recursive: true });
}
const source = 'def add(a, b):\n    return\n\n\ndef mul(a, b):\n    return\n';
fs.writeFileSync(path.join(ws, 'shapes.py'), source);
fs.writeFileSync(path.join(ws, '.env'), 'API_KEY=do-not-send\n');
fs.writeFileSync(path.join(ws, 'other.py'), 'x = 1\n');
fs.writeFileSync(
	path.join(userData, 'User', 'settings.json'),
	JSON.stringify({
		'security.workspace.trust.enabled': false,
		'workbench.startupEditor': 'none',
		'telemetry.telemetryLevel': 'off',
		'extensions.autoCheckUpdates': false,
		'editor.inlineSuggest.enabled': true,
		// Only the inline completion: no suggestion widget, no auto-closing pairs in the typed text.
		'editor.quickSuggestions': { other: false, comments: false, strings: false },
		'editor.suggestOnTriggerCharacters': false,
		'editor.autoClosingBrackets': 'never',
		'starLs.serverPath': bin,
		'starLs.dataDir': data,
		'starLs.multiline': 'line',
		'starLs.debounceMs': 0,
		'starLs.captureIdleMs': 600000,
		'starLs.trace.server': 'verbose',
	}),
);

const env = { ...process.env, STAR_LS_MODEL: model, XDG_CONFIG_HOME: path.join(dir, 'config'), XDG_DATA_HOME: path.join(dir, 'share') };
const common = ['--user-data-dir', userData, '--extensions-dir', extensions];
execFileSync(process.execPath, [codeServer, ...common, '--install-extension', vsix], { env, stdio: 'inherit' });

const port = await freePort();
const server = spawn(
	process.execPath,
	[codeServer, ...common, '--auth', 'none', '--bind-addr', `127.0.0.1:${port}`, '--disable-telemetry', '--disable-update-check', '--log', 'trace', ws],
	{ env, stdio: ['ignore', 'pipe', 'pipe'] },
);
let serverLog = '';
server.stdout.on('data', (b) => (serverLog += b));
server.stderr.on('data', (b) => (serverLog += b));

let browser;
let failed = false;
const consoleErrors = [];
try {
	await until('code-server to listen', 60_000, () =>
		fetch(`http://127.0.0.1:${port}/healthz`).then((r) => r.ok, () => false),
	);
	browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
	const page = await browser.newPage();
	page.on('console', (m) => m.type() === 'error' && consoleErrors.push(m.text().slice(0, 300)));
	await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(ws)}`);
	await page.waitForSelector('.monaco-workbench', { timeout: 120_000 });
	log('workbench loaded');

	/** Opens `name` from the Explorer. */
	const open = (name) =>
		page.locator('.explorer-folders-view .monaco-list-row', { hasText: name }).first().click({ timeout: 60_000 });
	await open('shapes.py');
	const editor = page.locator('.editor-instance .monaco-editor').first();
	await editor.waitFor({ timeout: 30_000 });
	await until('the file in the editor', 30_000, async () => (await editor.locator('.view-line').count()) >= 6);
	// The server answers once its model is loaded: the status bar names the model then.
	const modelName = path.basename(model, '.gguf');
	await page.locator('.statusbar-item', { hasText: modelName }).first().waitFor({ timeout: 120_000 });
	log('model ready');

	/** The ghost text shown, or ''. */
	const ghost = () => page.locator('.ghost-text-decoration, .ghost-text').allInnerTexts().then((t) => t.join(''));
	/** Line `n` (1-based) as the editor renders it (non-breaking spaces as spaces). */
	const line = (n) =>
		page.evaluate((n) => {
			const lines = [...document.querySelectorAll('.editor-instance .monaco-editor .view-line')];
			lines.sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top));
			return (lines[n - 1]?.textContent ?? '').replace(/\u00a0/g, ' ');
		}, n);
	/** Puts the cursor at the end of line `n` and types a space, which asks for an inline completion. */
	async function completeAtEndOf(n) {
		await page.keyboard.press('Control+G');
		await page.keyboard.type(String(n));
		await page.keyboard.press('Enter');
		await page.keyboard.press('End');
		await page.keyboard.type(' ');
		const text = await until(`ghost text on line ${n}`, 60_000, async () => (await ghost()).trim() !== '' && ghost());
		log(`line ${n}: ghost text ${JSON.stringify(text)}`);
		return text.replace(/\u00a0/g, ' ');
	}

	// 1. Accept with Tab.
	const proposal = await completeAtEndOf(2);
	await page.keyboard.press('Tab');
	const accepted = await until('the accepted text', 10_000, async () => {
		const l = await line(2);
		return l.trim() !== 'return' && l;
	});
	log(`accepted: ${JSON.stringify(accepted)}`);
	assert.equal(accepted, `    return ${proposal}`);

	// 2. Dismiss the next one with Escape, type something else and end the line.
	const second = await completeAtEndOf(6);
	await page.keyboard.press('Escape');
	await until('the ghost text to go', 10_000, async () => (await ghost()).trim() === '');
	const typed = second.startsWith('b * a') ? 'a * b  # mine' : 'b * a';
	await page.keyboard.type(typed, { delay: 30 });
	await page.keyboard.press('Enter');

	// Both decided (the second completion's line left the first; Enter ended the second): in the store.
	const recorded = await until('two cases in the store', 30_000, () => {
		const all = cases(data);
		return all.length >= 2 && all;
	});
	log(`cases:\n${recorded.map((c) => JSON.stringify(c)).join('\n')}`);
	const guard = recorded.find((c) => c.kind === 'guard');
	const failure = recorded.find((c) => c.kind === 'failure');
	assert.ok(guard && failure, 'a guard and a failure case');
	assert.equal(guard.outcome, 'accepted');
	assert.equal(guard.target, proposal);
	assert.ok(guard.prefix.endsWith('def add(a, b):\n    return '), guard.prefix);
	assert.equal(failure.target, typed);
	assert.equal(failure.outcome, 'rejected');
	// Escape went through the extension's dismissal, which names the completion it rejects.
	const rejected = traceLog().match(/Sending notification 'star\/didReject'[^]*?"completionId": "([^"]+)"/);
	assert.equal(rejected?.[1], failure.completionId, 'star/didReject for the completion dismissed');
	assert.equal(failure.proposed, second);
	assert.ok(failure.prefix.endsWith('def mul(a, b):\n    return '), failure.prefix);
	assert.ok(guard.document.endsWith('/shapes.py') && guard.workspace.endsWith('/ws'), JSON.stringify(guard));

	// .env, then other.py: the trace of what the extension sent shows other.py opened, and nothing of .env.
	await open('.env');
	await open('other.py');
	const sent = await until('other.py opened on the server', 30_000, () => {
		const trace = traceLog();
		return trace.includes(`${ws}/other.py`) && trace;
	});
	assert.ok(sent.includes(`${ws}/shapes.py`), 'the trace shows shapes.py opened');
	assert.ok(!sent.includes(`${ws}/.env`) && !sent.includes('do-not-send'), '.env was sent to the server');
	log('ok');
} catch (e) {
	failed = true;
	await browser?.contexts()[0]?.pages()[0]?.screenshot({ path: path.join(dir, 'failed.png') }).catch(() => {});
	console.error('[vscode e2e] FAILED:', e);
	console.error(`code-server's log:\n${serverLog}`);
	console.error(`the page's console errors:\n${consoleErrors.join('\n')}`);
	console.error(`kept: ${dir}`);
} finally {
	await browser?.close();
	server.kill();
}
if (!failed) {
	fs.rmSync(dir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
