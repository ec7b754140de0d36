// Where the extension completes: on/off, snooze, languages, exclusion.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import * as S from '../src/switches';

describe('switches', () => {
	const py = { path: '/home/dev/proj/app.py', languageId: 'python' };
	const now = Date.UTC(2026, 11, 6, 12, 0);

	test('on by default, every language, the default exclusions', () => {
		const s = S.switchesOf({});
		assert.equal(S.whyNot(py, s, now), undefined);
		assert.deepEqual(s.exclude, S.DEFAULT_EXCLUDE);
		for (const path of ['/p/.env', '/p/.env.local', '/p/server.pem', '/p/tls.key', '/home/dev/.ssh/id_ed25519']) {
			assert.equal(S.whyNot({ path, languageId: 'plaintext' }, s, now), 'excluded', path);
		}
		assert.equal(S.whyNot({ path: '/p/environment.py', languageId: 'python' }, s, now), undefined);
	});

	test('off, snoozed, another language, a path glob', () => {
		assert.equal(S.whyNot(py, S.switchesOf({ enable: false }), now), 'off');
		assert.equal(S.whyNot(py, S.switchesOf({}, now + 60_000), now), 'snoozed');
		assert.equal(S.whyNot(py, S.switchesOf({}, now - 1), now), undefined, 'a snooze ends');
		assert.equal(S.whyNot(py, S.switchesOf({ languages: ['rust'] }), now), 'language');
		assert.equal(S.whyNot(py, S.switchesOf({ exclude: ['**/proj/**'] }), now), 'excluded');
		assert.equal(S.whyNot({ path: '/p/.env', languageId: 'x' }, S.switchesOf({ exclude: [] }), now), undefined);
	});

	test('the status bar says off or until when', () => {
		assert.equal(S.switchesText(S.switchesOf({}), now), '');
		assert.equal(S.switchesText(S.switchesOf({ enable: false }), now), '$(circle-slash) off');
		assert.match(S.switchesText(S.switchesOf({}, now + 30 * 60_000), now), /^\$\(clock\) snoozed until \d\d:\d\d$/);
	});
});
