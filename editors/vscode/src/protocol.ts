// What the extension says to star-ls and how it reads the answers. Plain TypeScript with no import of
// `vscode` (nor of the language client), so every rule here runs and is tested in plain node against the
// real server. `extension.ts` is the glue that feeds VS Code's values in and shows what comes out.

// ---------------------------------------------------------------------------------------------------------
// Names

/** `star-ls serve`: LSP over stdio. */
export const SERVER_ARGS: readonly string[] = ['serve'];

/** Client → server notifications; the server infers outcomes from `didChange` too, these make them exact. */
export const Notification = {
	didAccept: 'star/didAccept',
	didReject: 'star/didReject',
	/** Server → client: `star.status`'s answer, sent on every change. */
	status: 'star/status',
} as const;

/** Commands the server runs through `workspace/executeCommand`. */
export const ServerCommand = {
	/** Carried by every inline item: VS Code runs it after the user accepts the item (= `star/didAccept`). */
	accepted: 'star.accepted',
	status: 'star.status',
	repairNow: 'star.repairNow',
	listPatches: 'star.listPatches',
	rollback: 'star.rollback',
	explain: 'star.explain',
} as const;

/**
 * The extension's own commands. They live in `starLs.*`, not `star.*`: the language client registers a VS
 * Code command for each command the server announces, under the server's name, and a second registration of
 * the same name would fail.
 */
export const ExtensionCommand = {
	status: 'starLs.status',
	repairNow: 'starLs.repairNow',
	listPatches: 'starLs.listPatches',
	rollback: 'starLs.rollback',
	explain: 'starLs.explain',
	restart: 'starLs.restart',
	dismissInline: 'starLs.dismissInline',
	menu: 'starLs.menu',
	toggle: 'starLs.toggle',
	snooze: 'starLs.snooze',
} as const;

/** The settings section (`starLs.*` in package.json). */
export const SETTINGS_SECTION = 'starLs';

export interface CompletionIdParams {
	completionId: string;
}

export interface NotificationMessage<P> {
	method: string;
	params: P;
}

export function acceptNotification(completionId: string): NotificationMessage<CompletionIdParams> {
	return { method: Notification.didAccept, params: { completionId } };
}

export function rejectNotification(completionId: string): NotificationMessage<CompletionIdParams> {
	return { method: Notification.didReject, params: { completionId } };
}

/** `workspace/executeCommand` params for a server command. */
export function executeCommandParams(command: string, args: unknown[] = []): { command: string; arguments: unknown[] } {
	return { command, arguments: args };
}

/** `star.rollback` takes one patch id, or `"all"`. */
export function rollbackParams(patchId: string | 'all'): { command: string; arguments: unknown[] } {
	if (!patchId) {
		throw new Error('rollback needs a patch id or "all"');
	}
	return executeCommandParams(ServerCommand.rollback, [patchId]);
}

export function explainParams(completionId: string): { command: string; arguments: unknown[] } {
	if (!completionId) {
		throw new Error('explain needs a completion id');
	}
	return executeCommandParams(ServerCommand.explain, [completionId]);
}

// ---------------------------------------------------------------------------------------------------------
// Settings → initializationOptions, environment, documents

export type Multiline = 'auto' | 'line' | 'block';

/** The server's `initializationOptions` (all optional; camelCase as the server reads them). */
export interface InitializationOptions {
	modelPath?: string;
	maxTokens?: number;
	threads?: number;
	debounceMs?: number;
	multiline?: Multiline;
	temperature?: number;
	captureIdleMs?: number;
	storeMaxMb?: number;
	/** Globs beside the server's own (`.env*`, `*.pem`, `*.key`, `id_*`). */
	exclude?: string[];
}

/** The settings (`starLs.<key>`) that become initialization options of the same name. */
export const INIT_OPTION_KEYS = [
	'modelPath',
	'maxTokens',
	'threads',
	'debounceMs',
	'multiline',
	'temperature',
	'captureIdleMs',
	'storeMaxMb',
	'exclude',
] as const satisfies readonly (keyof InitializationOptions)[];

/** The settings the extension itself reads. */
export const EXTENSION_SETTING_KEYS = [
	'serverPath',
	'dataDir',
	'logLevel',
	'languages',
	'completionList',
	'statusRefreshSeconds',
	'enable',
] as const;

/** Settings the language client reads itself (`<client id>.trace.server`). */
export const CLIENT_SETTING_KEYS = ['trace.server'] as const;

const MULTILINE: readonly Multiline[] = ['auto', 'line', 'block'];

/** Expands a leading `~` or `~/`: VS Code settings hold such paths, the server takes them literally. */
export function expandHome(path: string, home: string | undefined): string {
	if (!home) {
		return path;
	}
	if (path === '~') {
		return home;
	}
	if (path.startsWith('~/')) {
		return home.replace(/\/+$/, '') + path.slice(1);
	}
	return path;
}

function integerIn(value: unknown, min: number, max: number): number | undefined {
	return typeof value === 'number' && Number.isInteger(value) && value >= min && value <= max ? value : undefined;
}

/**
 * The server's `initializationOptions` from the settings the user set (`settings[key]`, keys without the
 * `starLs.` prefix). A setting that is absent, null or empty is left out, so the server's own default holds;
 * `threads: 0` means "all cores", the server's default, and is left out too. A value of the wrong type or out
 * of range is left out with a warning rather than sent: the server would reject the whole object.
 */
export function initializationOptions(
	settings: Readonly<Record<string, unknown>>,
	home?: string,
): { options: InitializationOptions; warnings: string[] } {
	const options: InitializationOptions = {};
	const warnings: string[] = [];
	const bad = (key: string, want: string) =>
		warnings.push(`starLs.${key}: ${JSON.stringify(settings[key])} is not ${want}; using the server's default`);

	for (const key of INIT_OPTION_KEYS) {
		const value = settings[key];
		if (value === undefined || value === null || (typeof value === 'string' && value.trim() === '')) {
			continue;
		}
		switch (key) {
			case 'modelPath':
				if (typeof value === 'string' && value.trim() !== '') {
					options.modelPath = expandHome(value.trim(), home);
				} else {
					bad(key, 'a path');
				}
				break;
			case 'maxTokens': {
				const n = integerIn(value, 1, 1024);
				n === undefined ? bad(key, 'an integer from 1 to 1024') : (options.maxTokens = n);
				break;
			}
			case 'threads': {
				const n = integerIn(value, 0, 4096);
				if (n === undefined) {
					bad(key, 'an integer ≥ 0');
				} else if (n > 0) {
					options.threads = n;
				}
				break;
			}
			case 'debounceMs':
			case 'captureIdleMs': {
				const n = integerIn(value, 0, Number.MAX_SAFE_INTEGER);
				n === undefined ? bad(key, 'an integer ≥ 0 (milliseconds)') : (options[key] = n);
				break;
			}
			case 'multiline':
				if (typeof value === 'string' && (MULTILINE as readonly string[]).includes(value)) {
					options.multiline = value as Multiline;
				} else {
					bad(key, `one of ${MULTILINE.join(', ')}`);
				}
				break;
			case 'temperature':
				if (typeof value === 'number' && Number.isFinite(value) && value >= 0) {
					options.temperature = value;
				} else {
					bad(key, 'a number ≥ 0');
				}
				break;
			case 'storeMaxMb':
				if (typeof value === 'number' && Number.isFinite(value) && value > 0) {
					options.storeMaxMb = value;
				} else {
					bad(key, 'a number > 0 (MB)');
				}
				break;
			case 'exclude':
				if (Array.isArray(value) && value.every((g) => typeof g === 'string')) {
					options.exclude = value.filter((g) => g.trim() !== '');
				} else {
					bad(key, 'a list of globs');
				}
				break;
		}
	}
	return { options, warnings };
}

/** The server's environment: the editor's, plus `STAR_LS_DATA_DIR` and `STAR_LS_LOG` when set. */
export function serverEnvironment(
	settings: Readonly<Record<string, unknown>>,
	base: Readonly<Record<string, string | undefined>>,
	home?: string,
): Record<string, string> {
	const env: Record<string, string> = {};
	for (const [k, v] of Object.entries(base)) {
		if (v !== undefined) {
			env[k] = v;
		}
	}
	const dataDir = settings.dataDir;
	if (typeof dataDir === 'string' && dataDir.trim() !== '') {
		env.STAR_LS_DATA_DIR = expandHome(dataDir.trim(), home);
	}
	const log = settings.logLevel;
	if (typeof log === 'string' && log.trim() !== '') {
		env.STAR_LS_LOG = log.trim();
	}
	return env;
}

/** The command that starts the server: `starLs.serverPath` (default `star-ls` on PATH) with `serve`. */
export function serverCommand(
	settings: Readonly<Record<string, unknown>>,
	home?: string,
): { command: string; args: string[] } {
	const path = settings.serverPath;
	const command = typeof path === 'string' && path.trim() !== '' ? expandHome(path.trim(), home) : 'star-ls';
	return { command, args: [...SERVER_ARGS] };
}

export interface DocumentFilter {
	scheme: string;
	language?: string;
}

/**
 * Files and untitled buffers, every language: `starLs.languages` and the other switches (switches.ts) apply
 * per request, so changing them needs no restart.
 */
export const DOCUMENT_SELECTOR: readonly DocumentFilter[] = [{ scheme: 'file' }, { scheme: 'untitled' }];

// ---------------------------------------------------------------------------------------------------------
// Completions and their ids

interface CommandLike {
	command?: unknown;
	arguments?: unknown;
}

/**
 * The id of a completion the server made: from an inline item's `star.accepted` command (an LSP item, or the
 * `vscode.InlineCompletionItem` the client turned it into; both keep `command.command` and
 * `command.arguments`), or from a completion list item's `data.completionId`.
 */
export function completionIdOf(item: unknown): string | undefined {
	if (item === null || typeof item !== 'object') {
		return undefined;
	}
	const command = (item as { command?: unknown }).command as CommandLike | undefined;
	if (command && typeof command === 'object' && command.command === ServerCommand.accepted) {
		const id = completionIdFromArgs(command.arguments);
		if (id !== undefined) {
			return id;
		}
	}
	const data = (item as { data?: unknown }).data;
	if (data && typeof data === 'object') {
		const id = (data as { completionId?: unknown }).completionId;
		if (typeof id === 'string' && id !== '') {
			return id;
		}
	}
	return undefined;
}

/** The completion id in `star.accepted`'s arguments (`[completionId]`). */
export function completionIdFromArgs(args: unknown): string | undefined {
	if (!Array.isArray(args) || args.length === 0) {
		return undefined;
	}
	const id = args[0];
	if (typeof id === 'string' && id !== '') {
		return id;
	}
	if (id && typeof id === 'object' && typeof (id as CompletionIdParams).completionId === 'string') {
		return (id as CompletionIdParams).completionId;
	}
	return undefined;
}

/**
 * The patches whose entries fired while an inline item was made: the second argument of its `star.accepted`
 * command (`{fired: [ids]}`); undefined when the item does not say (the rest of a completion shown before).
 */
export function firedOf(item: unknown): string[] | undefined {
	const args = (item as { command?: CommandLike } | null)?.command?.arguments;
	const fired = Array.isArray(args) ? (args[1] as { fired?: unknown } | undefined)?.fired : undefined;
	return Array.isArray(fired) ? fired.filter((f): f is string => typeof f === 'string') : undefined;
}

/** Where a completion came from, for the status bar: the patches that shaped it, or the model alone. */
export function provenanceText(fired: readonly string[] | undefined): string {
	if (fired === undefined) {
		return '';
	}
	return fired.length === 0 ? 'the model alone' : `shaped by ${fired.join(', ')}`;
}

export interface Position {
	line: number;
	character: number;
}

/** The text of an inline item (a plain string or a snippet; only the plain text is tracked). */
export function insertTextOf(item: unknown): string {
	if (item === null || typeof item !== 'object') {
		return '';
	}
	const text = (item as { insertText?: unknown }).insertText;
	if (typeof text === 'string') {
		return text;
	}
	if (text && typeof text === 'object' && typeof (text as { value?: unknown }).value === 'string') {
		return (text as { value: string }).value;
	}
	return '';
}

export interface ShownCompletion {
	completionId: string;
	uri: string;
	/** Where the item's text starts. */
	line: number;
	character: number;
	insertText: string;
	/** The patches that fired while it was made (`firedOf`). */
	fired?: string[];
	/** ms since the epoch. */
	shownAt: number;
	outcome?: 'accepted' | 'rejected';
}

/**
 * The completions the editor was handed, newest last: the last one per document decides which id a dismissal
 * (Escape) rejects, and the recent ones are what `explain` offers. Accept and dismiss each mark an item once.
 */
export class ShownCompletions {
	private readonly items: ShownCompletion[] = [];

	constructor(private readonly keep = 30) {}

	shown(entry: Omit<ShownCompletion, 'shownAt' | 'outcome'>, now = Date.now()): void {
		const known = this.items.findIndex((s) => s.completionId === entry.completionId);
		// The rest of a completion typed into comes back under its id without saying what fired: keep it.
		const fired = entry.fired ?? (known >= 0 ? this.items[known].fired : undefined);
		if (known >= 0) {
			this.items.splice(known, 1);
		}
		this.items.push({ ...entry, fired, shownAt: now });
		while (this.items.length > this.keep) {
			this.items.shift();
		}
	}

	/** Marks an accepted id; false when it was unknown or already decided here. */
	accepted(completionId: string): boolean {
		const item = this.items.find((s) => s.completionId === completionId);
		if (!item || item.outcome) {
			return false;
		}
		item.outcome = 'accepted';
		return true;
	}

	/**
	 * The id a dismissal at `pos` in `uri` rejects: the document's newest undecided item when the cursor is on
	 * its line at or after its start (typing that matched the item keeps it visible); else none, as the visible
	 * suggestion is then not ours.
	 */
	dismissed(uri: string, pos: Position): string | undefined {
		for (let i = this.items.length - 1; i >= 0; i--) {
			const item = this.items[i];
			if (item.uri !== uri) {
				continue;
			}
			if (item.outcome || item.line !== pos.line || pos.character < item.character) {
				return undefined;
			}
			item.outcome = 'rejected';
			return item.completionId;
		}
		return undefined;
	}

	/** Newest first. */
	recent(): readonly ShownCompletion[] {
		return [...this.items].reverse();
	}

	last(): ShownCompletion | undefined {
		return this.items[this.items.length - 1];
	}
}

// ---------------------------------------------------------------------------------------------------------
// Status

export type StatusState = 'ready' | 'loading' | 'failed' | 'unknown' | 'offline';

export interface StatusView {
	/** Status bar text, with codicons. */
	text: string;
	tooltip: string;
	state: StatusState;
}

interface ModelInfo {
	state: StatusState;
	name: string;
	detail: string;
}

function basename(path: string): string {
	const parts = path.split(/[\\/]/);
	return parts[parts.length - 1] || path;
}

function modelName(path: string): string {
	return basename(path).replace(/\.gguf$/i, '');
}

/** Reads `status.model`: `loading PATH`, `ready: PATH (3.1 s)`, `failed: reason`, or an object with a path. */
function modelInfo(status: Record<string, unknown>): ModelInfo {
	const model = status.model;
	const configured = typeof status.modelPath === 'string' ? status.modelPath : '';
	if (typeof model === 'string') {
		const ready = /^ready:\s*(.*?)(?:\s+\(([^)]*)\))?\s*$/.exec(model);
		if (ready) {
			return { state: 'ready', name: modelName(ready[1] || configured), detail: model };
		}
		const loading = /^loading\s+(.*)$/.exec(model);
		if (loading) {
			return { state: 'loading', name: modelName(loading[1] || configured), detail: model };
		}
		if (model.startsWith('failed')) {
			return { state: 'failed', name: configured ? modelName(configured) : 'model', detail: model };
		}
		if (model.trim() === '') {
			return {
				state: 'loading',
				name: configured ? modelName(configured) : 'model',
				detail: 'model not loaded yet',
			};
		}
		return { state: 'unknown', name: model.length > 40 ? modelName(model) : model, detail: model };
	}
	if (model && typeof model === 'object') {
		const m = model as Record<string, unknown>;
		const path = [m.path, m.name, m.modelPath, configured].find((v): v is string => typeof v === 'string' && v !== '');
		const state = typeof m.state === 'string' ? m.state : typeof m.status === 'string' ? m.status : '';
		const known: StatusState = /ready|loaded/i.test(state)
			? 'ready'
			: /load/i.test(state)
				? 'loading'
				: /fail|error/i.test(state)
					? 'failed'
					: 'unknown';
		return { state: known, name: path ? modelName(path) : 'model', detail: JSON.stringify(model) };
	}
	return { state: 'unknown', name: configured ? modelName(configured) : 'model', detail: 'no model reported' };
}

function count(value: unknown): number | undefined {
	if (typeof value === 'number' && Number.isFinite(value)) {
		return value;
	}
	if (Array.isArray(value)) {
		return value.length;
	}
	return undefined;
}

function plural(n: number, one: string, many: string): string {
	return `${n} ${n === 1 ? one : many}`;
}

/** The status bar item for a `star.status` answer: model, pending failures, patches; details in the tooltip. */
export function statusView(status: unknown): StatusView {
	if (!status || typeof status !== 'object') {
		return { text: '$(question) star-ls', tooltip: `star-ls: unexpected status ${JSON.stringify(status)}`, state: 'unknown' };
	}
	const s = status as Record<string, unknown>;
	const model = modelInfo(s);
	const failures = count(s.failuresPending);
	const guards = count(s.guardCases);
	const patches = count(s.patches);
	const repairing = s.repairRunning === true;

	const icon = repairing
		? '$(sync~spin)'
		: { ready: '$(sparkle)', loading: '$(loading~spin)', failed: '$(error)', unknown: '$(question)', offline: '$(circle-slash)' }[
				model.state
			];
	const parts = [`${icon} ${model.state === 'failed' ? 'model failed' : model.name}`];
	if (failures) {
		parts.push(`$(issues) ${failures}`);
	}
	if (patches) {
		parts.push(`$(wrench) ${patches}`);
	}
	const storeError = typeof s.storeError === 'string' && s.storeError !== '' ? s.storeError : undefined;
	if (storeError) {
		parts.push('$(warning) store');
	}

	const lines = [
		`star-ls — ${model.detail}`,
		`pending failures: ${failures ?? '?'}`,
		`guard cases: ${guards ?? '?'}`,
		`patches: ${patches ?? '?'}`,
	];
	if (repairing) {
		lines.push('repair running');
	}
	if (storeError) {
		lines.push(`feedback store error: ${storeError}`);
	}
	const last = s.lastRepair;
	if (last && typeof last === 'object') {
		lines.push(`last repair: ${describeRepair(last)}`);
	}
	const completions = s.completions as Record<string, unknown> | null | undefined;
	if (completions && typeof completions === 'object' && typeof completions.completed === 'number') {
		lines.push(`completions: ${completions.completed} made, ${count(completions.cancelled) ?? 0} cancelled`);
	}
	lines.push('', 'Click for details');
	return { text: parts.join('  '), tooltip: lines.join('\n'), state: repairing ? 'ready' : model.state };
}

/** The status bar item while no server answers. */
export function offlineStatusView(reason: string): StatusView {
	return { text: '$(circle-slash) star-ls', tooltip: `star-ls is not running: ${reason}`, state: 'offline' };
}

/** A short summary of a status for a message. */
export function statusSummary(status: unknown): string {
	if (!status || typeof status !== 'object') {
		return `star-ls: ${JSON.stringify(status)}`;
	}
	const s = status as Record<string, unknown>;
	const model = modelInfo(s);
	const failures = count(s.failuresPending) ?? 0;
	const guards = count(s.guardCases) ?? 0;
	const patches = count(s.patches) ?? 0;
	return (
		`star-ls: ${model.detail}; ${plural(failures, 'pending failure', 'pending failures')}, ` +
		`${plural(guards, 'guard case', 'guard cases')}, ${plural(patches, 'patch', 'patches')}` +
		(s.repairRunning === true ? '; repair running' : '')
	);
}

// ---------------------------------------------------------------------------------------------------------
// Command answers

/** One line for a repair report (`patchId`, `failures`, `fixed`, `guardBefore`, `guardAfter`, `seconds`). */
export function describeRepair(report: unknown): string {
	if (report === null || report === undefined) {
		return 'nothing to repair';
	}
	if (typeof report !== 'object') {
		return String(report);
	}
	const r = report as Record<string, unknown>;
	const parts: string[] = [];
	if (r.patchId !== undefined && r.patchId !== null) {
		parts.push(`patch ${String(r.patchId)}`);
	} else if ('patchId' in r) {
		parts.push('no patch');
	}
	if (typeof r.fixed === 'number' && typeof r.failures === 'number') {
		parts.push(`fixed ${r.fixed} of ${r.failures} failures`);
	} else if (typeof r.failures === 'number') {
		parts.push(plural(r.failures, 'failure', 'failures'));
	}
	if (typeof r.guardBefore === 'number' && typeof r.guardAfter === 'number') {
		parts.push(`guard cases passing ${r.guardBefore} → ${r.guardAfter}`);
	}
	if (typeof r.seconds === 'number') {
		parts.push(`${r.seconds.toFixed(1)} s`);
	}
	return parts.length > 0 ? parts.join(', ') : JSON.stringify(report);
}

export interface PatchEntry {
	id: string;
	label: string;
	detail: string;
}

/** The date of a `createdMs`, as `YYYY-MM-DD HH:MM` in local time. */
function dateOf(ms: number): string {
	const d = new Date(ms);
	const two = (n: number) => String(n).padStart(2, '0');
	return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}`;
}

/**
 * The patches of a `star.listPatches` answer (the ledger's records: `id`, `createdMs`, `report` with what the
 * repair fixed, `cases`, `gated`, `damaged`), each with its date and its repair's summary.
 */
export function patchesOf(result: unknown): PatchEntry[] {
	if (!Array.isArray(result)) {
		return [];
	}
	const entries: PatchEntry[] = [];
	for (const p of result) {
		if (!p || typeof p !== 'object' || typeof (p as { id?: unknown }).id !== 'string') {
			continue;
		}
		const o = p as Record<string, unknown>;
		const cases = Array.isArray(o.cases) ? o.cases.length : undefined;
		const detail = [
			// Its own id is the label already.
			o.report && typeof o.report === 'object'
				? describeRepair(Object.fromEntries(Object.entries(o.report).filter(([k]) => k !== 'patchId')))
				: '',
			cases === undefined ? '' : `learned from ${plural(cases, 'case', 'cases')}`,
			typeof o.damaged === 'string' ? `not applied: ${o.damaged}` : '',
		];
		entries.push({
			id: o.id as string,
			label: typeof o.createdMs === 'number' ? `${o.id} · ${dateOf(o.createdMs)}` : (o.id as string),
			detail: detail.filter((d) => d !== '').join(' · '),
		});
	}
	return entries;
}

/** Pretty text for `star.explain` (or any other JSON answer). */
export function prettyResult(result: unknown): string {
	if (typeof result === 'string') {
		return result;
	}
	if (result === undefined) {
		return '(no answer)';
	}
	return JSON.stringify(result, null, 2);
}

/** The message of a failed request (a JSON-RPC error, an Error, or anything). */
export function errorMessage(error: unknown): string {
	if (error && typeof error === 'object' && typeof (error as { message?: unknown }).message === 'string') {
		return (error as { message: string }).message;
	}
	return String(error);
}
