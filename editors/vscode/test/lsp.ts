// A scripted editor against the real star-ls binary over stdio, built on vscode-languageserver-protocol/node
// (what vscode-languageclient itself is built on). It does what VS Code does on the wire: initialize with the
// extension's options, open and edit documents incrementally, ask for inline completions, run commands, send
// the extension's notifications, and shut down. No mock server anywhere.

import { ChildProcess, spawn, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
	createProtocolConnection,
	ExecuteCommandRequest,
	InitializeRequest,
	InitializeResult,
	InlineCompletionItem,
	InlineCompletionList,
	InlineCompletionRequest,
	InlineCompletionTriggerKind,
	ProtocolConnection,
	StreamMessageReader,
	StreamMessageWriter,
} from 'vscode-languageserver-protocol/node';
import * as P from '../src/protocol';

/** The binary and model the integration tests use, or why they cannot run. */
export function serverUnderTest(): { bin: string; model: string } | { skip: string } {
	const bin = process.env.STAR_LS_BIN;
	if (!bin) {
		return { skip: 'STAR_LS_BIN is not set (the star-ls binary to test)' };
	}
	if (!fs.existsSync(bin)) {
		return { skip: `STAR_LS_BIN=${bin} does not exist` };
	}
	const model =
		process.env.STAR_LS_MODEL ||
		path.join(os.homedir(), '.cache', 'star-ls', 'models', 'qwen2.5-coder-0.5b-instruct-q4_k_m.gguf');
	if (!fs.existsSync(model)) {
		return { skip: `no model at ${model} (set STAR_LS_MODEL, or run scripts/fetch-model)` };
	}
	return { bin, model };
}

export interface ServerMessage {
	method: string;
	params: any;
}

/** A document as the editor holds it, sending incremental `didChange` as VS Code does. */
export class EditorDocument {
	version = 1;

	constructor(
		private readonly session: Session,
		readonly uri: string,
		readonly languageId: string,
		public text: string,
	) {}

	lines(): string[] {
		return this.text.split('\n');
	}

	/** The end of the document, as an LSP position (ASCII test texts: UTF-16 = chars). */
	end(): P.Position {
		const lines = this.lines();
		return { line: lines.length - 1, character: lines[lines.length - 1].length };
	}

	private offset(pos: P.Position): number {
		const lines = this.lines();
		let at = 0;
		for (let i = 0; i < pos.line; i++) {
			at += lines[i].length + 1;
		}
		return at + pos.character;
	}

	/** Replaces `start..end` with `text` and tells the server, as one incremental change. */
	async replace(start: P.Position, end: P.Position, text: string): Promise<void> {
		const s = this.offset(start);
		const e = this.offset(end);
		this.text = this.text.slice(0, s) + text + this.text.slice(e);
		this.version += 1;
		await this.session.connection.sendNotification('textDocument/didChange', {
			textDocument: { uri: this.uri, version: this.version },
			contentChanges: [{ range: { start, end }, text }],
		});
	}

	insert(at: P.Position, text: string): Promise<void> {
		return this.replace(at, at, text);
	}

	/** Types `text` one character at a time, as keystrokes arrive. */
	async type(at: P.Position, text: string): Promise<P.Position> {
		let pos = { ...at };
		for (const ch of text) {
			await this.insert(pos, ch);
			pos = ch === '\n' ? { line: pos.line + 1, character: 0 } : { line: pos.line, character: pos.character + 1 };
		}
		return pos;
	}

	/** What VS Code does when the user accepts an inline item: insert its text at its range. */
	async applyInline(item: InlineCompletionItem): Promise<void> {
		const range = item.range!;
		await this.replace(range.start, range.end, P.insertTextOf(item));
	}

	async inlineCompletion(at: P.Position): Promise<InlineCompletionItem[]> {
		const result = await this.session.connection.sendRequest(InlineCompletionRequest.type, {
			textDocument: { uri: this.uri },
			position: at,
			context: { triggerKind: InlineCompletionTriggerKind.Automatic },
		});
		if (!result) {
			return [];
		}
		return Array.isArray(result) ? result : (result as InlineCompletionList).items;
	}

	async close(): Promise<void> {
		await this.session.connection.sendNotification('textDocument/didClose', { textDocument: { uri: this.uri } });
	}
}

export class Session {
	readonly connection: ProtocolConnection;
	readonly messages: ServerMessage[] = [];
	stderr = '';
	private readonly exited: Promise<number | null>;

	private constructor(
		readonly proc: ChildProcess,
		readonly env: NodeJS.ProcessEnv,
		readonly bin: string,
		readonly dir: string,
	) {
		proc.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
		this.exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
		this.connection = createProtocolConnection(
			new StreamMessageReader(proc.stdout!),
			new StreamMessageWriter(proc.stdin!),
		);
		this.connection.onRequest('window/workDoneProgress/create', (params) => {
			this.messages.push({ method: 'window/workDoneProgress/create', params });
			return null;
		});
		this.connection.onRequest('client/registerCapability', () => null);
		this.connection.onRequest('workspace/configuration', () => []);
		for (const method of ['$/progress', 'window/showMessage', 'window/logMessage']) {
			this.connection.onNotification(method, (params: any) => {
				this.messages.push({ method, params });
			});
		}
		this.connection.listen();
	}

	/** Starts `star-ls serve` in a fresh data dir (`STAR_LS_DATA_DIR`) and initializes it with `settings`. */
	static async start(
		server: { bin: string; model: string },
		settings: Record<string, unknown>,
	): Promise<{ session: Session; init: InitializeResult }> {
		const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'star-ls-vscode-test-'));
		const env = {
			...process.env,
			STAR_LS_MODEL: server.model,
			STAR_LS_DATA_DIR: path.join(dir, 'data'),
			STAR_LS_LOG: process.env.STAR_LS_LOG ?? 'warn',
		};
		fs.mkdirSync(env.STAR_LS_DATA_DIR, { recursive: true });
		const proc = spawn(server.bin, [...P.SERVER_ARGS], { env, stdio: ['pipe', 'pipe', 'pipe'] });
		const session = new Session(proc, env, server.bin, dir);
		const { options, warnings } = P.initializationOptions(settings);
		if (warnings.length > 0) {
			throw new Error(`settings: ${warnings.join('; ')}`);
		}
		const init = await session.connection.sendRequest(InitializeRequest.type, {
			processId: process.pid,
			rootUri: null,
			capabilities: {
				window: { workDoneProgress: true },
				textDocument: {
					synchronization: { dynamicRegistration: false },
					inlineCompletion: { dynamicRegistration: false },
				},
				workspace: { executeCommand: { dynamicRegistration: false } },
			},
			initializationOptions: options,
		});
		await session.connection.sendNotification('initialized', {});
		return { session, init };
	}

	async open(name: string, languageId: string, text: string): Promise<EditorDocument> {
		const uri = 'file://' + path.join(this.dir, name);
		fs.writeFileSync(path.join(this.dir, name), text);
		const doc = new EditorDocument(this, uri, languageId, text);
		await this.connection.sendNotification('textDocument/didOpen', {
			textDocument: { uri, languageId, version: doc.version, text },
		});
		return doc;
	}

	execute(command: string, args: unknown[] = []): Promise<any> {
		return this.connection.sendRequest(ExecuteCommandRequest.type, P.executeCommandParams(command, args));
	}

	/** A command's answer, or the message of the error it answered. */
	async executeOrError(command: string, args: unknown[] = []): Promise<{ result?: unknown; error?: string }> {
		try {
			return { result: await this.execute(command, args) };
		} catch (e) {
			return { error: P.errorMessage(e) };
		}
	}

	async notify(n: P.NotificationMessage<unknown>): Promise<void> {
		await this.connection.sendNotification(n.method, n.params);
	}

	/** Polls `star.status` until `done` holds or `ms` pass; returns the last status. */
	async statusUntil(done: (status: any) => boolean, ms: number): Promise<any> {
		const deadline = Date.now() + ms;
		for (;;) {
			const status = await this.execute(P.ServerCommand.status);
			if (done(status) || Date.now() > deadline) {
				return status;
			}
			await new Promise((r) => setTimeout(r, 100));
		}
	}

	/** `shutdown` then `exit`, as VS Code does on close; resolves with the exit code. */
	async shutdown(ms = 20_000): Promise<number | null> {
		await this.connection.sendRequest('shutdown');
		await this.connection.sendNotification('exit');
		const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), ms).unref());
		const code = await Promise.race([this.exited, timeout]);
		this.connection.dispose();
		if (code === 'timeout') {
			this.proc.kill('SIGKILL');
			throw new Error(`star-ls did not exit within ${ms} ms of shutdown/exit`);
		}
		return code;
	}

	/** Ends the server whatever state it is in (test cleanup). */
	kill(): void {
		this.connection.dispose();
		if (this.proc.exitCode === null && this.proc.signalCode === null) {
			this.proc.kill('SIGKILL');
		}
	}

	/** `star-ls cases export [--kind K]` on this session's data dir, parsed. */
	exportCases(kind?: 'failure' | 'guard'): ExportedCase[] {
		return exportCases(this.bin, this.env, kind);
	}

	removeDir(): void {
		fs.rmSync(this.dir, { recursive: true, force: true });
	}
}

export interface ExportedCase {
	id: string;
	language: string;
	prefix: string;
	suffix: string;
	target: string;
	group: string;
	kind: 'failure' | 'guard';
	outcome: 'accepted' | 'rejected' | 'corrected';
	proposed: string;
	[key: string]: unknown;
}

export function exportCases(bin: string, env: NodeJS.ProcessEnv, kind?: 'failure' | 'guard'): ExportedCase[] {
	const args = ['cases', 'export', ...(kind ? ['--kind', kind] : [])];
	const run = spawnSync(bin, args, { env, encoding: 'utf8', timeout: 30_000 });
	if (run.status !== 0) {
		throw new Error(`star-ls ${args.join(' ')} exited ${run.status}: ${run.stderr.trim()}`);
	}
	return run.stdout
		.split('\n')
		.filter((l) => l.trim() !== '')
		.map((l, i) => {
			try {
				return JSON.parse(l) as ExportedCase;
			} catch (e) {
				throw new Error(`cases export line ${i + 1} is not JSON (${P.errorMessage(e)}): ${l}`);
			}
		});
}
