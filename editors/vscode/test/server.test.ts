// The extension's protocol against the real star-ls binary (STAR_LS_BIN) and model (STAR_LS_MODEL), each
// server in a fresh STAR_LS_DATA_DIR. What the store holds afterwards is read with `star-ls cases export`.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as P from '../src/protocol';
import { EditorDocument, Session, serverUnderTest } from './lsp';

const server = serverUnderTest();
const skip = 'skip' in server ? server.skip : false;
const bin = 'skip' in server ? { bin: '', model: '' } : server;
const MODEL_NAME = 'qwen2.5-coder-0.5b-instruct-q4_k_m';

/** A text the developer types instead of the proposal: never the proposal itself. */
function otherThan(proposal: string, text: string): string {
	return proposal.trim() === text.trim() ? `${text}  # mine` : text;
}

async function oneInline(doc: EditorDocument, at: P.Position) {
	const items = await doc.inlineCompletion(at);
	assert.equal(items.length, 1, `one inline item at ${at.line}:${at.character} in ${doc.uri}`);
	const item = items[0];
	const id = P.completionIdOf(item);
	assert.ok(id, `the item carries its completion id: ${JSON.stringify(item)}`);
	assert.ok(P.insertTextOf(item).trim() !== '', 'the item has text');
	assert.deepEqual(item.range?.start, at, 'the item starts at the cursor');
	return { item, id: id!, text: P.insertTextOf(item) };
}

test('accept, type over and reject, sent as the extension sends them, end up in the store', { skip, timeout: 240_000 }, async (t) => {
	const { session, init } = await Session.start(bin, {
		maxTokens: 24,
		debounceMs: 0,
		multiline: 'line',
		captureIdleMs: 120_000, // only the notifications and shutdown decide here
		temperature: 0,
		threads: 2,
		storeMaxMb: 64,
	});
	t.after(() => {
		if (session.stderr.trim() !== '') {
			t.diagnostic(`server stderr:\n${session.stderr.trim()}`);
		}
		session.kill();
		if (!process.env.STAR_LS_KEEP) {
			session.removeDir();
		}
	});
	t.diagnostic(`data dir: ${session.env.STAR_LS_DATA_DIR}`);

	// What vscode-languageclient reads to wire itself: incremental sync, inline completions, the commands.
	const caps = init.capabilities;
	const sync = caps.textDocumentSync;
	assert.equal(typeof sync === 'number' ? sync : sync?.change, 2, 'incremental sync');
	assert.ok(caps.inlineCompletionProvider, 'inlineCompletionProvider');
	const commands = caps.executeCommandProvider?.commands ?? [];
	assert.ok(commands.includes(P.ServerCommand.accepted), `server announces star.accepted: ${commands}`);
	assert.ok(commands.includes(P.ServerCommand.status), `server announces star.status: ${commands}`);
	assert.equal(init.serverInfo?.name, 'star-ls');
	assert.ok(
		!session.messages.some((m) => m.method === 'window/showMessage' && /initializationOptions/.test(m.params.message)),
		`the server took every option: ${JSON.stringify(session.messages)}`,
	);
	const clash = commands.filter((c) => (Object.values(P.ExtensionCommand) as string[]).includes(c));
	assert.deepEqual(clash, [], 'no server command collides with an extension command');

	// 1. Accepted: VS Code inserts the item's text at its range, then runs its command.
	const add = await session.open('add.py', 'python', 'def add(a, b):\n    return ');
	const first = await oneInline(add, { line: 1, character: 11 });
	assert.equal(first.item.command?.command, P.ServerCommand.accepted);
	assert.equal(P.completionIdOf(first.item), first.id);
	assert.deepEqual(P.firedOf(first.item), [], 'no patch fired: the model alone');
	await add.applyInline(first.item);
	await session.execute(first.item.command!.command, first.item.command!.arguments); // answers, no error
	t.diagnostic(`accepted ${first.id}: ${JSON.stringify(first.text)}`);

	// The model loaded with $/progress on a token the server created.
	const progress = await waitFor(() => {
		const kinds = session.messages.filter((m) => m.method === '$/progress').map((m) => m.params.value?.kind);
		return kinds.includes('begin') && kinds.includes('end') ? kinds : undefined;
	}, 10_000);
	assert.ok(progress, `$/progress begin..end while loading: ${JSON.stringify(session.messages)}`);
	assert.ok(session.messages.some((m) => m.method === 'window/workDoneProgress/create'));

	// 2. Typed over: another document; the developer types their own text and ends the line (VS Code sends
	// only the edits; the line's end decides it).
	const mul = await session.open('mul.py', 'python', 'def mul(a, b):\n    return ');
	const second = await oneInline(mul, { line: 1, character: 11 });
	const typed = otherThan(second.text, 'a * b  # by hand');
	await mul.type({ line: 1, character: 11 }, typed + '\n');
	t.diagnostic(`typed over ${second.id}: ${JSON.stringify(second.text)} -> ${JSON.stringify(typed)}`);

	// 3. Rejected: a completion on a new line of the first document, dismissed with Escape (the extension
	// sends star/didReject); the developer types their own text and moves to the next line.
	await add.insert(add.end(), '\n\nprint(add(');
	const third = await oneInline(add, add.end());
	await session.notify(P.rejectNotification(third.id));
	const own = otherThan(third.text, '2, 3))');
	await add.type(add.end(), own + '\n');
	t.diagnostic(`rejected ${third.id}: ${JSON.stringify(third.text)}, then typed ${JSON.stringify(own)}`);

	// The status bar's view of it.
	const status = await session.statusUntil((s) => s.guardCases >= 1 && s.failuresPending >= 2, 5_000);
	t.diagnostic(`status: ${JSON.stringify(status)}`);
	const view = P.statusView(status);
	assert.equal(view.state, 'ready', view.tooltip);
	assert.ok(view.text.includes(MODEL_NAME), view.text);
	assert.equal(status.guardCases, 1, 'one guard case in star.status');
	assert.equal(status.failuresPending, 2, 'two pending failures in star.status');
	assert.ok(view.text.includes('$(issues) 2'), view.text);
	assert.match(P.statusSummary(status), /2 pending failures, 1 guard case, 0 patches/);

	// The other commands answer, or fail with a message the extension can show.
	for (const [command, args] of [
		[P.ServerCommand.explain, [first.id]],
		[P.ServerCommand.listPatches, []],
	] as const) {
		const answer = await session.executeOrError(command, [...args]);
		t.diagnostic(`${command}: ${JSON.stringify(answer)}`);
		assert.ok(answer.error === undefined || answer.error.trim() !== '', `${command} error has a message`);
		if (command === P.ServerCommand.listPatches && answer.error === undefined) {
			assert.deepEqual(P.patchesOf(answer.result), [], 'no patches yet');
		}
	}
	const rollback = P.rollbackParams('all');
	const rolled = await session.executeOrError(rollback.command, rollback.arguments);
	t.diagnostic(`star.rollback all: ${JSON.stringify(rolled)}`);
	assert.ok(rolled.error === undefined || rolled.error.trim() !== '');

	assert.equal(await session.shutdown(), 0, `exit code; stderr:\n${session.stderr}`);

	const cases = session.exportCases();
	t.diagnostic(`cases export:\n${cases.map((c) => JSON.stringify(c)).join('\n')}`);
	for (const c of cases) {
		for (const key of ['id', 'language', 'prefix', 'suffix', 'target', 'group', 'kind', 'outcome', 'proposed']) {
			assert.ok(key in c, `case has ${key}: ${JSON.stringify(c)}`);
		}
		assert.equal(c.language, 'python');
	}
	const guards = cases.filter((c) => c.kind === 'guard');
	const failures = cases.filter((c) => c.kind === 'failure');
	assert.equal(guards.length, 1, 'one guard case');
	assert.equal(failures.length, 2, 'two failure cases');

	const byId = (id: string) => cases.filter((c) => c.completionId === undefined || c.completionId === id);
	const guard = guards[0];
	assert.ok(byId(first.id).includes(guard), 'the guard case is the accepted completion');
	assert.equal(guard.outcome, 'accepted');
	assert.equal(guard.prefix, 'def add(a, b):\n    return ');
	assert.equal(guard.proposed, first.text);
	assert.equal(guard.target, first.text.split('\n')[0]);

	const corrected = failures.find((c) => c.prefix === 'def mul(a, b):\n    return ');
	assert.ok(corrected, 'a failure case at mul');
	assert.ok(byId(second.id).includes(corrected));
	// Typing through the whole proposal and on is a correction of it; anything else, a rejection.
	assert.equal(corrected.outcome, typed.startsWith(second.text) ? 'corrected' : 'rejected');
	assert.equal(corrected.target, typed, "the target is the developer's text to the end of the line");
	assert.equal(corrected.proposed, second.text);

	const rejected = failures.find((c) => c.prefix.endsWith('print(add('));
	assert.ok(rejected, 'a failure case at print(add(');
	assert.ok(byId(third.id).includes(rejected));
	assert.equal(rejected.outcome, 'rejected');
	assert.equal(rejected.target, own, 'the target is what the developer typed after dismissing');
	assert.equal(rejected.proposed, third.text);
	assert.equal(rejected.prefix, 'def add(a, b):\n    return ' + first.text + '\n\nprint(add(');

	assert.deepEqual(session.exportCases('guard').map((c) => c.id), [guard.id]);
	assert.deepEqual(
		session.exportCases('failure').map((c) => c.id).sort(),
		failures.map((c) => c.id).sort(),
	);
});

test('without notifications, the server decides from edits: idle time and closing the document', { skip, timeout: 240_000 }, async (t) => {
	const { session } = await Session.start(bin, { maxTokens: 16, debounceMs: 0, multiline: 'line', captureIdleMs: 400 });
	t.after(() => {
		if (session.stderr.trim() !== '') {
			t.diagnostic(`server stderr:\n${session.stderr.trim()}`);
		}
		session.kill();
		if (!process.env.STAR_LS_KEEP) {
			session.removeDir();
		}
	});

	// Typed over: decided once captureIdleMs passes with no edit (before any shutdown).
	const sub = await session.open('sub.py', 'python', 'def sub(a, b):\n    return ');
	const shown = await oneInline(sub, { line: 1, character: 11 });
	const typed = otherThan(shown.text, 'b - a  # typed');
	await sub.type({ line: 1, character: 11 }, typed);
	const status = await session.statusUntil((s) => s.failuresPending >= 1, 8_000);
	t.diagnostic(`status after idle: ${JSON.stringify(status)}`);
	assert.equal(status.failuresPending, 1, 'decided as a failure after captureIdleMs, with no notification');

	// Inserted as VS Code inserts it, without the command; then the document closes.
	const neg = await session.open('neg.py', 'python', 'def neg(a):\n    return ');
	const inserted = await oneInline(neg, { line: 1, character: 11 });
	await neg.applyInline(inserted.item);
	await neg.close();
	const after = await session.statusUntil((s) => s.guardCases >= 1, 8_000);
	assert.equal(after.guardCases, 1, 'the inserted completion counted as accepted');

	assert.equal(await session.shutdown(), 0, `exit code; stderr:\n${session.stderr}`);
	const cases = session.exportCases();
	t.diagnostic(`cases export:\n${cases.map((c) => JSON.stringify(c)).join('\n')}`);
	assert.equal(cases.length, 2);
	const failure = cases.find((c) => c.kind === 'failure');
	assert.ok(failure);
	assert.ok(['corrected', 'rejected'].includes(failure.outcome), failure.outcome);
	assert.equal(failure.target, typed);
	assert.equal(failure.proposed, shown.text);
	const guard = cases.find((c) => c.kind === 'guard');
	assert.ok(guard);
	assert.equal(guard.outcome, 'accepted');
	assert.equal(guard.target, inserted.text.split('\n')[0]);
});

async function waitFor<T>(probe: () => T | undefined, ms: number): Promise<T | undefined> {
	const deadline = Date.now() + ms;
	for (;;) {
		const value = probe();
		if (value !== undefined || Date.now() > deadline) {
			return value;
		}
		await new Promise((r) => setTimeout(r, 50));
	}
}
