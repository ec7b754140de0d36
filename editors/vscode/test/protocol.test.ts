// The protocol module on its own: settings, ids, status text, command answers, and the manifest's agreement
// with it. No server needed.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, test } from 'node:test';
import * as P from '../src/protocol';

const manifest = JSON.parse(fs.readFileSync(path.resolve(__dirname, '..', '..', 'package.json'), 'utf8'));

describe('settings → initializationOptions', () => {
	test('every option the user set, camelCase as the server reads it', () => {
		const { options, warnings } = P.initializationOptions({
			modelPath: '/models/q.gguf',
			maxTokens: 32,
			threads: 2,
			debounceMs: 0,
			multiline: 'block',
			temperature: 0.2,
			captureIdleMs: 8000,
			storeMaxMb: 256,
		});
		assert.deepEqual(warnings, []);
		assert.deepEqual(options, {
			modelPath: '/models/q.gguf',
			maxTokens: 32,
			threads: 2,
			debounceMs: 0,
			multiline: 'block',
			temperature: 0.2,
			captureIdleMs: 8000,
			storeMaxMb: 256,
		});
	});

	test('unset, empty and "server default" values are left out', () => {
		const { options, warnings } = P.initializationOptions({
			modelPath: '  ',
			threads: 0,
			storeMaxMb: null,
			multiline: undefined,
			serverPath: '/bin/star-ls', // an extension setting, not an option
		});
		assert.deepEqual(options, {});
		assert.deepEqual(warnings, []);
	});

	test('a bad value is left out with a warning that names the setting', () => {
		const { options, warnings } = P.initializationOptions({
			maxTokens: 0,
			threads: 1.5,
			debounceMs: -1,
			multiline: 'paragraph',
			temperature: 'hot',
			captureIdleMs: '8000',
			storeMaxMb: 0,
			modelPath: 7,
		});
		assert.deepEqual(options, {});
		assert.equal(warnings.length, 8);
		assert.match(warnings.find((w) => w.startsWith('starLs.multiline'))!, /one of auto, line, block/);
	});

	test('~ in paths is the home directory', () => {
		assert.equal(P.initializationOptions({ modelPath: '~/m.gguf' }, '/home/dev').options.modelPath, '/home/dev/m.gguf');
		assert.equal(P.expandHome('~', '/h'), '/h');
		assert.equal(P.expandHome('/a/~/b', '/h'), '/a/~/b');
		assert.equal(P.expandHome('~/x', undefined), '~/x');
	});

	test('environment and command', () => {
		const env = P.serverEnvironment({ dataDir: '~/star', logLevel: 'debug' }, { PATH: '/bin', GONE: undefined }, '/h');
		assert.deepEqual(env, { PATH: '/bin', STAR_LS_DATA_DIR: '/h/star', STAR_LS_LOG: 'debug' });
		assert.deepEqual(P.serverEnvironment({ dataDir: '', logLevel: '' }, { PATH: '/bin' }), { PATH: '/bin' });
		assert.deepEqual(P.serverCommand({}), { command: 'star-ls', args: ['serve'] });
		assert.deepEqual(P.serverCommand({ serverPath: '~/bin/star-ls' }, '/h'), { command: '/h/bin/star-ls', args: ['serve'] });
	});

	test('every file is opened on the server: the switches apply per request', () => {
		assert.deepEqual(P.DOCUMENT_SELECTOR, [{ scheme: 'file' }, { scheme: 'untitled' }]);
	});

	test('exclusion globs go to the server as a list', () => {
		assert.deepEqual(P.initializationOptions({ exclude: ['**/secrets/**', ''] }).options, { exclude: ['**/secrets/**'] });
		assert.equal(P.initializationOptions({ exclude: 'x' }).warnings.length, 1);
	});
});

describe('completion ids', () => {
	const lspItem = {
		insertText: 'a + b',
		range: { start: { line: 1, character: 11 }, end: { line: 1, character: 11 } },
		command: { title: 'Accept completion', command: 'star.accepted', arguments: ['19ab-1'] },
	};

	test('from an inline item, as the server sends it or as the client converts it', () => {
		assert.equal(P.completionIdOf(lspItem), '19ab-1');
		// vscode.InlineCompletionItem: the same command fields, insertText maybe a SnippetString
		assert.equal(P.completionIdOf({ insertText: { value: 'x' }, command: { title: '', command: 'star.accepted', arguments: ['7-2'] } }), '7-2');
		assert.equal(P.insertTextOf({ insertText: { value: 'x' } }), 'x');
		assert.equal(P.insertTextOf(lspItem), 'a + b');
	});

	test('from a completion list item', () => {
		assert.equal(P.completionIdOf({ label: 'x', data: { completionId: 'c-3' } }), 'c-3');
	});

	test('nothing from foreign items', () => {
		assert.equal(P.completionIdOf({ insertText: 'x', command: { command: 'other.cmd', arguments: ['1'] } }), undefined);
		assert.equal(P.completionIdOf({ insertText: 'x' }), undefined);
		assert.equal(P.completionIdOf(null), undefined);
		assert.equal(P.completionIdFromArgs([]), undefined);
		assert.equal(P.completionIdFromArgs([{ completionId: 'k' }]), 'k');
	});

	test('notifications and command params', () => {
		assert.deepEqual(P.acceptNotification('a'), { method: 'star/didAccept', params: { completionId: 'a' } });
		assert.deepEqual(P.rejectNotification('a'), { method: 'star/didReject', params: { completionId: 'a' } });
		assert.deepEqual(P.rollbackParams('all'), { command: 'star.rollback', arguments: ['all'] });
		assert.deepEqual(P.explainParams('a'), { command: 'star.explain', arguments: ['a'] });
		assert.throws(() => P.rollbackParams(''));
	});

	test('what fired: the second argument of a new item, nothing said for the rest of one', () => {
		const shaped = { ...lspItem, command: { ...lspItem.command, arguments: ['19ab-1', { fired: ['patch-3'] }] } };
		assert.deepEqual(P.firedOf(shaped), ['patch-3']);
		assert.equal(P.provenanceText(P.firedOf(shaped)), 'shaped by patch-3');
		assert.equal(P.provenanceText([]), 'the model alone');
		assert.equal(P.firedOf(lspItem), undefined);
		assert.equal(P.provenanceText(undefined), '');
	});
});

describe('shown completions', () => {
	const at = (id: string, uri = 'file:///a.py', line = 1, character = 11) => ({ completionId: id, uri, line, character, insertText: id });

	test('Escape rejects the newest item of the document when the cursor is on it', () => {
		const s = new P.ShownCompletions();
		s.shown(at('1'));
		s.shown(at('2'));
		s.shown(at('x', 'file:///b.py'));
		assert.equal(s.dismissed('file:///a.py', { line: 1, character: 13 }), '2');
		assert.equal(s.dismissed('file:///a.py', { line: 1, character: 13 }), undefined, 'once');
	});

	test('not when the cursor left its line or moved before it, nor after it was accepted', () => {
		const s = new P.ShownCompletions();
		s.shown(at('1'));
		assert.equal(s.dismissed('file:///a.py', { line: 2, character: 0 }), undefined);
		assert.equal(s.dismissed('file:///a.py', { line: 1, character: 3 }), undefined);
		assert.equal(s.accepted('1'), true);
		assert.equal(s.accepted('1'), false);
		assert.equal(s.dismissed('file:///a.py', { line: 1, character: 11 }), undefined);
		assert.equal(s.dismissed('file:///c.py', { line: 1, character: 11 }), undefined);
	});

	test('the rest of a completion keeps what fired for it', () => {
		const s = new P.ShownCompletions();
		s.shown({ ...at('1'), fired: ['patch-2'] });
		s.shown({ ...at('1'), character: 12 });
		assert.deepEqual(s.last()?.fired, ['patch-2']);
	});

	test('keeps the newest few, newest first', () => {
		const s = new P.ShownCompletions(3);
		for (const id of ['1', '2', '3', '4', '2']) {
			s.shown(at(id));
		}
		assert.deepEqual(s.recent().map((r) => r.completionId), ['2', '4', '3']);
		assert.equal(s.last()?.completionId, '2');
	});
});

describe('status bar', () => {
	const ready = {
		model: 'ready: /root/.cache/star-ls/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (3.1 s)',
		modelPath: null,
		documents: 1,
		failuresPending: 3,
		guardCases: 5,
		patches: 1,
		repairRunning: false,
		lastRepair: { patchId: 'p1', failures: 4, fixed: 3, guardBefore: 5, guardAfter: 5, seconds: 12.34 },
		completions: { completed: 9, cancelled: 2, failed: 0, last: null },
	};

	test('model, pending failures, patches', () => {
		const v = P.statusView(ready);
		assert.equal(v.state, 'ready');
		assert.equal(v.text, '$(sparkle) qwen2.5-coder-0.5b-instruct-q4_k_m  $(issues) 3  $(wrench) 1');
		assert.match(v.tooltip, /pending failures: 3/);
		assert.match(v.tooltip, /guard cases: 5/);
		assert.match(v.tooltip, /last repair: patch p1, fixed 3 of 4 failures, guard cases passing 5 → 5, 12.3 s/);
		assert.match(v.tooltip, /completions: 9 made, 2 cancelled/);
		assert.equal(P.statusSummary(ready), `star-ls: ${ready.model}; 3 pending failures, 5 guard cases, 1 patch`);
	});

	test('a store error shows', () => {
		const v = P.statusView({ ...ready, storeError: 'disk full' });
		assert.match(v.text, /\$\(warning\) store$/);
		assert.match(v.tooltip, /feedback store error: disk full/);
		assert.doesNotMatch(P.statusView({ ...ready, storeError: null }).text, /warning/);
	});

	test('nothing pending: the model alone', () => {
		const v = P.statusView({ ...ready, failuresPending: 0, patches: 0 });
		assert.equal(v.text, '$(sparkle) qwen2.5-coder-0.5b-instruct-q4_k_m');
	});

	test('loading, failed, repairing, unknown', () => {
		assert.equal(P.statusView({ model: 'loading /m/x.gguf', failuresPending: 0, patches: 0 }).text, '$(loading~spin) x');
		assert.equal(P.statusView({ model: '', modelPath: '/m/y.gguf' }).state, 'loading');
		const failed = P.statusView({ model: 'failed: truncated GGUF', failuresPending: 0, patches: 0 });
		assert.equal(failed.state, 'failed');
		assert.equal(failed.text, '$(error) model failed');
		assert.match(failed.tooltip, /truncated GGUF/);
		assert.match(P.statusView({ ...ready, repairRunning: true }).text, /^\$\(sync~spin\) /);
		assert.equal(P.statusView(null).state, 'unknown');
		assert.equal(P.statusView({ model: { path: '/m/z.gguf', state: 'loaded' }, patches: [1, 2] }).text, '$(sparkle) z  $(wrench) 2');
		assert.equal(P.offlineStatusView('ENOENT').state, 'offline');
	});
});

describe('command answers', () => {
	test('repair report', () => {
		assert.equal(
			P.describeRepair({ patchId: 7, failures: 2, fixed: 2, guardBefore: 10, guardAfter: 9, seconds: 3 }),
			'patch 7, fixed 2 of 2 failures, guard cases passing 10 → 9, 3.0 s',
		);
		assert.equal(P.describeRepair({ patchId: null, failures: 0 }), 'no patch, 0 failures');
		assert.equal(P.describeRepair(null), 'nothing to repair');
	});

	test('patch lists in the shapes a server may answer', () => {
		assert.deepEqual(P.patchesOf([]), []);
		// A record as star.listPatches answers it (the ledger's PatchRecord).
		const record = {
			id: 'patch-3',
			modelSha: '1d96',
			createdMs: new Date(2026, 11, 6, 9, 5).getTime(),
			active: true,
			report: { patchId: 'patch-3', pending: 4, failures: 3, fixed: 2, guardBefore: 1, guardAfter: 1, seconds: 7.2 },
			gated: true,
			cases: ['case-1', 'case-2', 'case-4'],
		};
		assert.deepEqual(P.patchesOf([record]), [
			{
				id: 'patch-3',
				label: 'patch-3 · 2026-12-06 09:05',
				detail: 'fixed 2 of 3 failures, guard cases passing 1 → 1, 7.2 s · learned from 3 cases',
			},
		]);
		assert.match(P.patchesOf([{ ...record, damaged: 'layer 30 > 24' }])[0].detail, /not applied: layer 30 > 24$/);
		assert.deepEqual(P.patchesOf([{ patchId: 4 }, 'a']), []);
		assert.deepEqual(P.patchesOf(null), []);
	});

	test('errors and pretty answers', () => {
		assert.equal(P.errorMessage({ code: -32603, message: 'not available yet' }), 'not available yet');
		assert.equal(P.errorMessage('x'), 'x');
		assert.equal(P.prettyResult({ a: 1 }), '{\n  "a": 1\n}');
		assert.equal(P.prettyResult('text'), 'text');
	});
});

describe('package.json agrees with the protocol module', () => {
	const properties = manifest.contributes.configuration.properties as Record<string, { default?: unknown }>;

	test('a starLs.* setting for every initialization option and extension setting', () => {
		const keys = [...P.INIT_OPTION_KEYS, ...P.EXTENSION_SETTING_KEYS, ...P.CLIENT_SETTING_KEYS];
		for (const key of keys) {
			assert.ok(`starLs.${key}` in properties, `starLs.${key} is contributed`);
		}
		assert.deepEqual(Object.keys(properties).sort(), keys.map((k) => `starLs.${k}`).sort());
	});

	test('the defaults as settings become no options at all (the server keeps its own defaults)', () => {
		const defaults = Object.fromEntries(
			P.INIT_OPTION_KEYS.map((k) => [k, properties[`starLs.${k}`].default]),
		);
		const { options, warnings } = P.initializationOptions(defaults);
		assert.deepEqual(warnings, []);
		// Only the values the server documents as its own defaults may remain.
		assert.deepEqual(options, {
			maxTokens: 64,
			debounceMs: 30,
			multiline: 'auto',
			temperature: 0,
			captureIdleMs: 8000,
			exclude: ['.env*', '*.pem', '*.key', 'id_*'],
		});
	});

	test('every extension command is contributed, and none in the server namespace', () => {
		const contributed = (manifest.contributes.commands as { command: string }[]).map((c) => c.command).sort();
		assert.deepEqual(contributed, Object.values(P.ExtensionCommand).sort());
		assert.ok(contributed.every((c) => !c.startsWith('star.')));
	});

	test('the client is a version with native inline completions (LSP 3.18)', () => {
		const version: string = manifest.dependencies['vscode-languageclient'];
		assert.match(version, /^\d+\.\d+\.\d+$/, 'pinned');
		assert.ok(Number(version.split('.')[0]) >= 10, version);
	});
});
