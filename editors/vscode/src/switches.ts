// Where star-ls completes: the user's switches (on/off, a snooze), the languages listed and the files
// excluded. Plain TypeScript, tested in node; `extension.ts` reads the settings and asks `whyNot` before each
// request, and an excluded document is never even opened on the server.

import { Minimatch } from 'minimatch';

/** Files never completed nor recorded; the server refuses these whatever a client sends. */
export const DEFAULT_EXCLUDE: readonly string[] = ['.env*', '*.pem', '*.key', 'id_*'];

export interface Switches {
	/** `starLs.enable`. */
	enabled: boolean;
	/** Completions paused until then (ms since the epoch); none while unset or past. */
	snoozedUntil?: number;
	/** `starLs.languages`: language ids to complete in; empty: every language. */
	languages: readonly string[];
	/** `starLs.exclude`: globs; one without `/` matches the file's name, one with it the whole path. */
	exclude: readonly string[];
}

function strings(value: unknown): string[] {
	return Array.isArray(value)
		? value.filter((v): v is string => typeof v === 'string' && v.trim() !== '').map((v) => v.trim())
		: [];
}

/** The switches from the settings (`enable`, `languages`, `exclude`), the snooze kept by the extension. */
export function switchesOf(settings: Readonly<Record<string, unknown>>, snoozedUntil?: number): Switches {
	return {
		enabled: settings.enable !== false,
		snoozedUntil,
		languages: strings(settings.languages),
		exclude: settings.exclude === undefined ? DEFAULT_EXCLUDE : strings(settings.exclude),
	};
}

/** Each glob compiled once: `excluded` runs at every edit the extension forwards. */
const compiled = new Map<string, Minimatch>();

/** Whether the file at `path` (a URI's path) matches one of `globs`. */
export function excluded(path: string, globs: readonly string[]): boolean {
	const name = path.split('/').pop() ?? path;
	return globs.some((glob) => {
		let m = compiled.get(glob);
		if (!m) {
			m = new Minimatch(glob, { dot: true });
			compiled.set(glob, m);
		}
		return m.match(glob.includes('/') ? path : name);
	});
}

/** Why star-ls does not complete in a document, or undefined when it does. */
export function whyNot(
	doc: { path: string; languageId: string },
	s: Switches,
	now = Date.now(),
): 'off' | 'snoozed' | 'language' | 'excluded' | undefined {
	if (!s.enabled) {
		return 'off';
	}
	if (s.snoozedUntil !== undefined && s.snoozedUntil > now) {
		return 'snoozed';
	}
	if (s.languages.length > 0 && !s.languages.includes(doc.languageId)) {
		return 'language';
	}
	return excluded(doc.path, s.exclude) ? 'excluded' : undefined;
}

/** The status bar's word on the switches: '' when completing, else off or snoozed (until when). */
export function switchesText(s: Switches, now = Date.now()): string {
	if (!s.enabled) {
		return '$(circle-slash) off';
	}
	if (s.snoozedUntil !== undefined && s.snoozedUntil > now) {
		const until = new Date(s.snoozedUntil);
		const hh = String(until.getHours()).padStart(2, '0');
		const mm = String(until.getMinutes()).padStart(2, '0');
		return `$(clock) snoozed until ${hh}:${mm}`;
	}
	return '';
}
