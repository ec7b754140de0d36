// VS Code glue: starts `star-ls serve` through vscode-languageclient, which serves inline completions natively
// (LSP 3.18 `textDocument/inlineCompletion`) and registers the server's `star.accepted` command that every
// inline item carries. What to send and how to read answers lives in `protocol.ts`; this file only moves
// VS Code's values in and out.

import * as os from 'os';
import * as vscode from 'vscode';
import {
	ExecuteCommandRequest,
	LanguageClient,
	LanguageClientOptions,
	Middleware,
	ServerOptions,
	State,
} from 'vscode-languageclient/node';
import * as P from './protocol';
import * as S from './switches';

let client: LanguageClient | undefined;
let output: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let statusTimer: NodeJS.Timeout | undefined;
let statusSoon: NodeJS.Timeout | undefined;
const shown = new P.ShownCompletions();
/** The last status the server pushed or answered; the status bar shows it with the switches and provenance. */
let lastView: P.StatusView = P.offlineStatusView('starting');
/** Completions paused until then (ms since the epoch), from the status bar's menu. */
let snoozedUntil: number | undefined;
let snoozeTimer: NodeJS.Timeout | undefined;
const SNOOZE_MINUTES = 30;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
	output = vscode.window.createOutputChannel('star-ls', { log: true });
	statusItem = vscode.window.createStatusBarItem('starLs.status', vscode.StatusBarAlignment.Right, 100);
	statusItem.name = 'star-ls';
	statusItem.command = P.ExtensionCommand.menu;
	showStatus(P.offlineStatusView('starting'));
	statusItem.show();
	context.subscriptions.push(output, statusItem, { dispose: () => stopStatusTimer() });

	const command = (name: string, run: (...args: any[]) => unknown) =>
		context.subscriptions.push(vscode.commands.registerCommand(name, run));
	command(P.ExtensionCommand.status, showStatusDetails);
	command(P.ExtensionCommand.repairNow, repairNow);
	command(P.ExtensionCommand.listPatches, listPatches);
	command(P.ExtensionCommand.rollback, rollback);
	command(P.ExtensionCommand.explain, explain);
	command(P.ExtensionCommand.restart, restart);
	command(P.ExtensionCommand.dismissInline, dismissInline);
	command(P.ExtensionCommand.menu, menu);
	command(P.ExtensionCommand.toggle, () => setEnabled(!switches().enabled));
	command(P.ExtensionCommand.snooze, () => snooze(snoozedUntil === undefined ? SNOOZE_MINUTES : 0));
	context.subscriptions.push(
		vscode.window.onDidChangeActiveTextEditor(() => showStatus()),
		{ dispose: () => snoozeTimer && clearTimeout(snoozeTimer) },
	);

	context.subscriptions.push(
		vscode.workspace.onDidChangeConfiguration(async (e) => {
			if (!e.affectsConfiguration(P.SETTINGS_SECTION)) {
				return;
			}
			startStatusTimer();
			showStatus();
			// The switches, the status interval and the suggestion list apply at once; the rest is read at start.
			const restartNeeded = [...P.INIT_OPTION_KEYS, 'serverPath', 'dataDir', 'logLevel'].some(
				(k) => e.affectsConfiguration(`${P.SETTINGS_SECTION}.${k}`),
			);
			if (!restartNeeded) {
				return;
			}
			const choice = await vscode.window.showInformationMessage(
				'star-ls settings changed: restart the server to apply them?',
				'Restart',
			);
			if (choice === 'Restart') {
				await restart();
			}
		}),
	);

	await start();
}

export async function deactivate(): Promise<void> {
	stopStatusTimer();
	const c = client;
	client = undefined;
	await c?.stop();
}

// ---------------------------------------------------------------------------------------------------------
// The client

function config(): vscode.WorkspaceConfiguration {
	return vscode.workspace.getConfiguration(P.SETTINGS_SECTION);
}

/** The settings the user set somewhere (defaults left out, so the server's own defaults hold). */
function explicitSettings(keys: readonly string[]): Record<string, unknown> {
	const c = config();
	const out: Record<string, unknown> = {};
	for (const key of keys) {
		const i = c.inspect(key);
		const value = i?.workspaceFolderValue ?? i?.workspaceValue ?? i?.globalValue;
		if (value !== undefined) {
			out[key] = value;
		}
	}
	return out;
}

function allSettings(keys: readonly string[]): Record<string, unknown> {
	const c = config();
	return Object.fromEntries(keys.map((k) => [k, c.get(k)]));
}

function switches(): S.Switches {
	return S.switchesOf(allSettings(['enable', 'languages', 'exclude']), snoozedUntil);
}

/** Why star-ls stays out of `document` (undefined: it completes there). */
function whyNot(document: vscode.TextDocument): string | undefined {
	return S.whyNot({ path: document.uri.path, languageId: document.languageId }, switches());
}

async function setEnabled(on: boolean): Promise<void> {
	await config().update('enable', on, vscode.ConfigurationTarget.Global);
	showStatus();
}

/** Pauses completions for `minutes` (0: resumes them now). */
function snooze(minutes: number): void {
	if (snoozeTimer) {
		clearTimeout(snoozeTimer);
		snoozeTimer = undefined;
	}
	snoozedUntil = minutes > 0 ? Date.now() + minutes * 60_000 : undefined;
	if (snoozedUntil !== undefined) {
		snoozeTimer = setTimeout(() => snooze(0), minutes * 60_000);
	}
	showStatus();
}

async function start(): Promise<void> {
	const home = os.homedir();
	const settings = allSettings(P.EXTENSION_SETTING_KEYS);
	const { command, args } = P.serverCommand(settings, home);
	const serverOptions: ServerOptions = {
		command,
		args,
		options: { env: P.serverEnvironment(settings, process.env, home) },
	};
	const { options, warnings } = P.initializationOptions(explicitSettings(P.INIT_OPTION_KEYS), home);
	for (const w of warnings) {
		output.warn(w);
		void vscode.window.showWarningMessage(w);
	}

	const clientOptions: LanguageClientOptions = {
		documentSelector: [...P.DOCUMENT_SELECTOR],
		initializationOptions: options,
		outputChannel: output,
		middleware: middleware(),
	};
	// The id `starLs` is also the prefix of `starLs.trace.server`, which the client reads.
	const c = new LanguageClient('starLs', 'star-ls', serverOptions, clientOptions);
	c.onDidChangeState((e) => {
		if (e.newState === State.Running) {
			void refreshStatus();
		} else if (e.newState === State.Stopped) {
			showStatus(P.offlineStatusView('stopped'));
		}
	});
	// The server pushes its status on every change (a repair starting and ending, new failures, patches).
	c.onNotification(P.Notification.status, (status: unknown) => showStatus(P.statusView(status)));
	client = c;
	try {
		await c.start();
	} catch (e) {
		const message = `star-ls: could not start \`${command} ${args.join(' ')}\`: ${P.errorMessage(e)}`;
		output.error(message);
		showStatus(P.offlineStatusView(P.errorMessage(e)));
		// Not awaited: activation must not wait for the user to answer.
		void vscode.window.showErrorMessage(message, 'Open Settings').then((choice) => {
			if (choice === 'Open Settings') {
				void vscode.commands.executeCommand('workbench.action.openSettings', P.SETTINGS_SECTION);
			}
		});
		return;
	}
	startStatusTimer();
	void refreshStatus();
}

async function restart(): Promise<void> {
	stopStatusTimer();
	const c = client;
	client = undefined;
	showStatus(P.offlineStatusView('restarting'));
	try {
		await c?.stop();
	} catch (e) {
		output.warn(`stopping star-ls: ${P.errorMessage(e)}`);
	}
	await start();
}

function middleware(): Middleware {
	// An excluded file is never opened on the server: its text stays in the editor.
	const unlessExcluded = <T>(document: vscode.TextDocument, next: () => T): T | Promise<void> =>
		S.excluded(document.uri.path, switches().exclude) ? Promise.resolve() : next();
	return {
		didOpen: (document, next) => unlessExcluded(document, () => next(document)),
		didChange: (event, next) => unlessExcluded(event.document, () => next(event)),
		didClose: (document, next) => unlessExcluded(document, () => next(document)),
		// The first item is the one VS Code shows: its id is what a dismissal rejects and `explain` offers.
		provideInlineCompletionItems: async (document, position, context, token, next) => {
			if (whyNot(document)) {
				return null;
			}
			const result = await next(document, position, context, token);
			const first = (Array.isArray(result) ? result : (result?.items ?? []))[0];
			const completionId = P.completionIdOf(first);
			if (first && completionId) {
				const start = first.range?.start ?? position;
				shown.shown({
					completionId,
					uri: document.uri.toString(),
					line: start.line,
					character: start.character,
					insertText: P.insertTextOf(first),
					fired: P.firedOf(first),
				});
				showStatus();
			}
			return result;
		},
		// The suggestion list runs the model a second time beside the inline completion, and the server keeps
		// one pending completion per document, so the two would cancel each other: off unless asked for.
		provideCompletionItem: (document, position, context, token, next) =>
			config().get<boolean>('completionList') && !whyNot(document)
				? next(document, position, context, token)
				: undefined,
		// VS Code runs an inline item's `star.accepted` after inserting it; the client forwards it to the server
		// (= `star/didAccept`). Note it here too.
		executeCommand: async (command, args, next) => {
			const result = await next(command, args);
			if (command === P.ServerCommand.accepted) {
				const id = P.completionIdFromArgs(args);
				if (id) {
					shown.accepted(id);
				}
				refreshStatusSoon();
			}
			return result;
		},
	};
}

function runningClient(): LanguageClient | undefined {
	return client && client.state === State.Running ? client : undefined;
}

async function serverCommand(command: string, args: unknown[] = []): Promise<unknown> {
	const c = runningClient();
	if (!c) {
		throw new Error('the server is not running (star-ls: Restart the Server)');
	}
	return c.sendRequest(ExecuteCommandRequest.type, P.executeCommandParams(command, args));
}

// ---------------------------------------------------------------------------------------------------------
// Dismissal

/** Escape while an inline suggestion shows: hide it as VS Code would, and reject it if it was ours. */
async function dismissInline(): Promise<void> {
	await vscode.commands.executeCommand('editor.action.inlineSuggest.hide');
	const editor = vscode.window.activeTextEditor;
	const c = runningClient();
	if (!editor || !c) {
		return;
	}
	const id = shown.dismissed(editor.document.uri.toString(), editor.selection.active);
	if (id) {
		const n = P.rejectNotification(id);
		await c.sendNotification(n.method, n.params);
		refreshStatusSoon();
	}
}

// ---------------------------------------------------------------------------------------------------------
// Status bar

/**
 * The status bar: the server's status (`view`, else the last one), then off or snoozed, then what shaped the
 * newest completion in the active editor.
 */
function showStatus(view: P.StatusView = lastView): void {
	lastView = view;
	const editor = vscode.window.activeTextEditor;
	const last = shown.last();
	const provenance =
		last && editor && last.uri === editor.document.uri.toString() ? P.provenanceText(last.fired) : '';
	const off = S.switchesText(switches());
	statusItem.text = [view.text, off, provenance && `$(git-commit) ${provenance}`].filter((t) => t).join('  ');
	statusItem.tooltip = [view.tooltip, provenance && `newest completion: ${provenance}`].filter((t) => t).join('\n');
	statusItem.backgroundColor =
		view.state === 'failed' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
}

/** The status bar's menu: switch completions off or on, snooze, and the commands. */
async function menu(): Promise<void> {
	const s = switches();
	const items = [
		{ label: s.enabled ? '$(circle-slash) Disable Completions' : '$(check) Enable Completions', run: () => setEnabled(!s.enabled) },
		{
			label: snoozedUntil === undefined ? `$(clock) Snooze for ${SNOOZE_MINUTES} Minutes` : '$(play) Resume Completions',
			run: () => snooze(snoozedUntil === undefined ? SNOOZE_MINUTES : 0),
		},
		{ label: '$(info) Status', run: showStatusDetails },
		{ label: '$(tools) Repair the Model Now', run: repairNow },
		{ label: '$(list-unordered) List Patches', run: listPatches },
		{ label: '$(question) Explain a Completion', run: () => explain() },
	];
	const pick = await vscode.window.showQuickPick(items, { title: 'star-ls' });
	await pick?.run();
}

async function fetchStatus(): Promise<unknown> {
	return serverCommand(P.ServerCommand.status);
}

async function refreshStatus(): Promise<void> {
	if (!runningClient()) {
		return;
	}
	try {
		const view = P.statusView(await fetchStatus());
		showStatus(view);
		if (view.state === 'loading') {
			refreshStatusSoon(1000); // show "ready" as soon as the model is
		}
	} catch (e) {
		showStatus(P.offlineStatusView(P.errorMessage(e)));
	}
}

function refreshStatusSoon(ms = 500): void {
	if (statusSoon) {
		clearTimeout(statusSoon);
	}
	statusSoon = setTimeout(() => {
		statusSoon = undefined;
		void refreshStatus();
	}, ms);
}

function startStatusTimer(): void {
	stopStatusTimer();
	const seconds = config().get<number>('statusRefreshSeconds') ?? 0;
	if (seconds > 0) {
		statusTimer = setInterval(() => void refreshStatus(), seconds * 1000);
	}
}

function stopStatusTimer(): void {
	if (statusTimer) {
		clearInterval(statusTimer);
		statusTimer = undefined;
	}
	if (statusSoon) {
		clearTimeout(statusSoon);
		statusSoon = undefined;
	}
}

// ---------------------------------------------------------------------------------------------------------
// Commands

function reportFailure(what: string, e: unknown): void {
	const message = `star-ls: ${what}: ${P.errorMessage(e)}`;
	output.error(message);
	void vscode.window.showErrorMessage(message);
}

function showDetails(title: string, body: string): void {
	output.info(`${title}\n${body}`);
	output.show(true);
}

async function showStatusDetails(): Promise<void> {
	let status: unknown;
	try {
		status = await fetchStatus();
	} catch (e) {
		reportFailure('status', e);
		return;
	}
	showStatus(P.statusView(status));
	const choice = await vscode.window.showInformationMessage(
		P.statusSummary(status),
		'Details',
		'Repair Now',
		'Patches',
	);
	if (choice === 'Details') {
		showDetails('star.status', P.prettyResult(status));
	} else if (choice === 'Repair Now') {
		await repairNow();
	} else if (choice === 'Patches') {
		await listPatches();
	}
}

async function repairNow(): Promise<void> {
	try {
		const report = await vscode.window.withProgress(
			{ location: vscode.ProgressLocation.Notification, title: 'star-ls: repairing the model…' },
			() => serverCommand(P.ServerCommand.repairNow),
		);
		void vscode.window.showInformationMessage(`star-ls: repair: ${P.describeRepair(report)}`);
		output.info(`star.repairNow\n${P.prettyResult(report)}`);
	} catch (e) {
		reportFailure('repair', e);
	} finally {
		void refreshStatus();
	}
}

async function fetchPatches(): Promise<P.PatchEntry[] | undefined> {
	try {
		return P.patchesOf(await serverCommand(P.ServerCommand.listPatches));
	} catch (e) {
		reportFailure('patches', e);
		return undefined;
	}
}

async function listPatches(): Promise<void> {
	const patches = await fetchPatches();
	if (!patches) {
		return;
	}
	if (patches.length === 0) {
		void vscode.window.showInformationMessage('star-ls: no patches');
		return;
	}
	const pick = await vscode.window.showQuickPick(
		patches.map((p) => ({ label: p.label, detail: p.detail, id: p.id })),
		{ title: 'star-ls patches', placeHolder: 'Pick a patch to roll back, or Escape' },
	);
	if (pick) {
		await rollback(pick.id);
	}
}

async function rollback(patchId?: unknown): Promise<void> {
	let id = typeof patchId === 'string' && patchId !== '' ? patchId : undefined;
	if (!id) {
		const patches = (await fetchPatches()) ?? [];
		const pick = await vscode.window.showQuickPick(
			[
				{ label: 'All patches', detail: 'Restore the unpatched model', id: 'all' },
				...patches.map((p) => ({ label: p.label, detail: p.detail, id: p.id })),
			],
			{ title: 'star-ls: roll back' },
		);
		id = pick?.id;
	}
	if (!id) {
		return;
	}
	const what = id === 'all' ? 'every patch' : `patch ${id}`;
	const ok = await vscode.window.showWarningMessage(`star-ls: roll back ${what}?`, { modal: true }, 'Roll Back');
	if (ok !== 'Roll Back') {
		return;
	}
	try {
		const p = P.rollbackParams(id);
		const result = await serverCommand(p.command, p.arguments);
		void vscode.window.showInformationMessage(`star-ls: rolled back ${what}`);
		output.info(`star.rollback ${id}\n${P.prettyResult(result)}`);
	} catch (e) {
		reportFailure('rollback', e);
	} finally {
		void refreshStatus();
	}
}

async function explain(completionId?: unknown): Promise<void> {
	let id = typeof completionId === 'string' && completionId !== '' ? completionId : undefined;
	if (!id) {
		const recent = shown.recent();
		const other = { label: 'Another id…', description: '', id: '' };
		const pick = await vscode.window.showQuickPick(
			[
				...recent.map((s) => ({
					label: s.insertText.split('\n')[0] || '(empty)',
					description: `${vscode.Uri.parse(s.uri).path.split('/').pop()}:${s.line + 1}${s.outcome ? ` · ${s.outcome}` : ''}`,
					detail: s.completionId,
					id: s.completionId,
				})),
				other,
			],
			{ title: 'star-ls: explain which completion?' },
		);
		if (!pick) {
			return;
		}
		id = pick.id || (await vscode.window.showInputBox({ prompt: 'Completion id' })) || undefined;
	}
	if (!id) {
		return;
	}
	try {
		const p = P.explainParams(id);
		showDetails(`star.explain ${id}`, P.prettyResult(await serverCommand(p.command, p.arguments)));
	} catch (e) {
		reportFailure('explain', e);
	}
}
