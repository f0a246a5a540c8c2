//! Session settings (SET, RESET, startup parameters) tracked per client so they survive
//! transaction pooling: replayed on whichever server connection the client gets next.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use crate::router::lex::{self, Tokens};

/// One change to session state made by a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `name` is set; `sql` is the statement that sets it, replayed verbatim.
    Set {
        name: String,
        sql: String,
    },
    Reset(String),
    ResetAll,
}

/// What a statement does to session state, beyond settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Effects {
    pub changes: Vec<Change>,
    /// DISCARD ALL / DEALLOCATE ALL / DISCARD PLANS: server-side prepared statements are gone.
    pub drops_prepared: bool,
}

impl Effects {
    /// Nothing for the proxy to track.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && !self.drops_prepared
    }
}

/// The session-state effects of a query string as the client sent it: the cheap first look
/// runs on the bytes, so the common query is never checked as UTF-8 here.
pub fn effects_of(sql: &[u8]) -> Effects {
    if !may_have_effects(sql) {
        return Effects::default();
    }
    effects(&String::from_utf8_lossy(sql))
}

/// The session-state effects of a whole query string.
pub fn effects(sql: &str) -> Effects {
    let mut out = Effects::default();
    if !may_have_effects(sql.as_bytes()) {
        return out;
    }
    for stmt in lex::statements(sql) {
        let mut tokens = Tokens::new(stmt);
        let first = tokens.next().map(str::to_ascii_lowercase);
        match first.as_deref() {
            Some("set") => out.changes.extend(set_change(stmt, tokens)),
            Some("reset") => out.changes.extend(reset_change(tokens)),
            Some("discard") => {
                let what = tokens.next().map(str::to_ascii_lowercase);
                if matches!(what.as_deref(), Some("all")) {
                    out.changes.push(Change::ResetAll);
                }
                if matches!(what.as_deref(), Some("all" | "plans")) {
                    out.drops_prepared = true;
                }
            }
            Some("deallocate") => out.drops_prepared = true,
            _ => {}
        }
    }
    out
}

/// A cheap first look, so the common query (one statement, not a session command) costs no
/// statement splitting: only a leading SET/RESET/DISCARD/DEALLOCATE, or a second statement, can
/// change session state. A leading comment gets the full look.
fn may_have_effects(b: &[u8]) -> bool {
    let (word, rest) = lex::lead_word(b);
    if word.is_empty() && matches!(rest.first(), Some(b'-' | b'/')) {
        return true;
    }
    if [&b"set"[..], b"reset", b"discard", b"deallocate"]
        .iter()
        .any(|command| lex::word_is(word, command))
    {
        return true;
    }
    // A semicolon followed by more than whitespace may start another statement.
    memchr::memchr(b';', b).is_some_and(|i| {
        b[i..]
            .iter()
            .any(|c| *c != b';' && !c.is_ascii_whitespace())
    })
}

fn set_change(stmt: &str, mut tokens: Tokens<'_>) -> Option<Change> {
    let sql = stmt.trim().to_string();
    let mut word = tokens.next()?.to_ascii_lowercase();
    if word == "session" {
        word = tokens.next()?.to_ascii_lowercase();
        match word.as_str() {
            "authorization" => return Some(set("session_authorization", sql)),
            "characteristics" => return Some(set("session_characteristics", sql)),
            _ => {}
        }
    }
    match word.as_str() {
        // Transaction-scoped: gone at commit, nothing to replay.
        "local" | "transaction" | "constraints" => None,
        "time" => Some(set("timezone", sql)),
        "role" => Some(set("role", sql)),
        _ => {
            let mut name = unquote(&word);
            // Custom settings are dotted: myapp.tenant
            for t in tokens.by_ref() {
                let lower = t.to_ascii_lowercase();
                if lower == "to" || lower == "=" {
                    break;
                }
                name.push_str(&unquote(&lower));
            }
            Some(set(&name, sql))
        }
    }
}

fn reset_change(mut tokens: Tokens<'_>) -> Option<Change> {
    let word = tokens.next()?.to_ascii_lowercase();
    Some(match word.as_str() {
        "all" => Change::ResetAll,
        "time" => Change::Reset("timezone".into()),
        "session" => Change::Reset("session_authorization".into()),
        _ => {
            let mut name = unquote(&word);
            for t in tokens {
                name.push_str(&unquote(&t.to_ascii_lowercase()));
            }
            Change::Reset(name)
        }
    })
}

fn set(name: &str, sql: String) -> Change {
    Change::Set {
        name: name.to_string(),
        sql,
    }
}

fn unquote(word: &str) -> String {
    word.trim_matches('"').to_string()
}

/// Quotes a value as a SQL string literal.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// What brings a server connection back to its defaults.
const RESET: &str = "SET SESSION AUTHORIZATION DEFAULT\n;RESET ALL";

/// A client's session settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    by_name: BTreeMap<String, String>,
    fingerprint: u64,
}

impl Settings {
    /// Settings from the startup packet. `user`, `database` and protocol options are not settings.
    ///
    /// # Errors
    /// Startup options Tessera cannot honour (`replication`, unparsable `options`).
    pub fn from_startup(params: &[(String, String)]) -> Result<Settings, String> {
        let mut settings = Settings::default();
        let mut changes = Vec::new();
        for (name, value) in params {
            match name.as_str() {
                "user" | "database" => {}
                "replication" => return Err("replication connections are not supported".into()),
                "options" => {
                    for (opt_name, opt_value) in parse_options(value)? {
                        changes.push(set(
                            &opt_name,
                            format!("SET {opt_name} TO {}", literal(&opt_value)),
                        ));
                    }
                }
                n if n.starts_with("_pq_.") => {}
                n => changes.push(set(
                    &n.to_ascii_lowercase(),
                    format!("SET {n} TO {}", literal(value)),
                )),
            }
        }
        settings.apply(&changes);
        Ok(settings)
    }

    /// Applies changes that took effect on the server.
    pub fn apply(&mut self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        for change in changes {
            match change {
                Change::Set { name, sql } => {
                    self.by_name.insert(name.clone(), sql.clone());
                }
                Change::Reset(name) => {
                    self.by_name.remove(name);
                }
                Change::ResetAll => self.by_name.clear(),
            }
        }
        self.fingerprint = if self.by_name.is_empty() {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.by_name.hash(&mut h);
            h.finish() | 1
        };
    }

    /// Identifies the settings: equal fingerprints mean nothing to replay. 0 = server defaults.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The statements that bring a server connection from any settings to these. Each is the
    /// client's own text, which may end in a `--` comment: a newline ends it before the `;`.
    /// `RESET ALL` leaves the role and the session user as they are, so those are reset first,
    /// as `DISCARD ALL` does: a previous client's `SET ROLE` stays its own.
    pub fn replay_sql(&self) -> String {
        let mut sql = String::from(RESET);
        for stmt in self.by_name.values() {
            sql.push_str("\n;");
            sql.push_str(stmt);
        }
        sql
    }

    /// The value a startup parameter asked for, for ParameterStatus.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.by_name.iter()
    }
}

/// Parses the startup `options` string: `-c name=value` and `--name=value`, space separated,
/// with backslash-escaped spaces.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next().ok_or("startup option -c needs name=value")?
        } else if let Some(p) = w.strip_prefix("--") {
            p.to_string()
        } else if let Some(p) = w.strip_prefix("-c") {
            p.to_string()
        } else {
            return Err(format!("unsupported startup option {w:?}"));
        };
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("startup option {pair:?} is not name=value"))?;
        out.push((
            name.replace('-', "_").to_ascii_lowercase(),
            value.to_string(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(sql: &str) -> Vec<Change> {
        effects(sql).changes
    }

    #[test]
    fn effects_of_bytes_are_the_effects_of_the_text() {
        for sql in [
            "SET x = 1",
            "SELECT 1",
            "select 1; reset all",
            "DISCARD ALL",
            "/* c */ deallocate all",
            "SETTLE",
        ] {
            assert_eq!(effects_of(sql.as_bytes()), effects(sql), "{sql}");
        }
        // Not UTF-8: still tracked (whether the bytes are acceptable is the server's call).
        assert_eq!(effects_of(b"SET x = '\xff'").changes.len(), 1);
    }

    #[test]
    fn the_first_look_misses_no_session_command() {
        for yes in [
            "SET x = 1",
            "  \n\tset x = 1",
            "/* why */ SET x = 1",
            "-- why\nRESET ALL",
            "Discard all",
            "DEALLOCATE ALL",
            "SELECT 1; SET x = 1",
            "SELECT 1 ;; select 2",
        ] {
            assert!(may_have_effects(yes.as_bytes()), "{yes}");
        }
        for no in [
            "",
            "SELECT 1",
            "SELECT 1;",
            "SELECT 1 ; \n ;",
            "SETTLE",
            "  select set from t",
        ] {
            assert!(!may_have_effects(no.as_bytes()), "{no}");
        }
        assert_eq!(
            changes("/* why */ SET x = 1"),
            vec![set("x", "/* why */ SET x = 1".into())]
        );
    }

    #[test]
    fn set_forms() {
        assert_eq!(
            changes("SET search_path TO app, public"),
            vec![set("search_path", "SET search_path TO app, public".into())]
        );
        assert_eq!(
            changes("set session statement_timeout = 5")[0],
            set(
                "statement_timeout",
                "set session statement_timeout = 5".into()
            )
        );
        assert_eq!(
            changes("SET TIME ZONE 'UTC'")[0],
            set("timezone", "SET TIME ZONE 'UTC'".into())
        );
        assert_eq!(
            changes("SET myapp.tenant = '7'")[0],
            set("myapp.tenant", "SET myapp.tenant = '7'".into())
        );
        assert!(changes("SET LOCAL work_mem = '1MB'").is_empty());
        assert!(changes("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").is_empty());
        assert_eq!(changes("RESET ALL"), vec![Change::ResetAll]);
        assert_eq!(
            changes("reset search_path"),
            vec![Change::Reset("search_path".into())]
        );
        assert_eq!(changes("select 1; set a = 1").len(), 1);
        assert!(changes("select 'set a = 1'").is_empty());
        assert!(effects("DISCARD ALL").drops_prepared);
        assert!(effects("deallocate all").drops_prepared);
    }

    #[test]
    fn fingerprint_tracks_content() {
        let mut a = Settings::default();
        assert_eq!(a.fingerprint(), 0);
        a.apply(&changes("SET x = 1"));
        let fp = a.fingerprint();
        assert_ne!(fp, 0);
        a.apply(&changes("SET x = 2"));
        assert_ne!(a.fingerprint(), fp);
        a.apply(&changes("RESET x"));
        assert_eq!(a.fingerprint(), 0);
        assert_eq!(a.replay_sql(), RESET);
    }

    #[test]
    fn startup_params_become_settings() {
        let params = vec![
            ("user".to_string(), "app".to_string()),
            ("application_name".to_string(), "it's".to_string()),
            (
                "options".to_string(),
                "-c search_path=a\\ b --work-mem=4MB".to_string(),
            ),
        ];
        let s = Settings::from_startup(&params).expect("startup");
        let sql = s.replay_sql();
        assert!(sql.contains("SET application_name TO 'it''s'"), "{sql}");
        assert!(sql.contains("SET search_path TO 'a b'"), "{sql}");
        assert!(sql.contains("SET work_mem TO '4MB'"), "{sql}");
        assert!(Settings::from_startup(&[("options".into(), "-x".into())]).is_err());
        // A setting whose text ends in a comment hides none that follow it.
        let mut t = Settings::default();
        t.apply(&changes("SET search_path TO app -- the tenant's"));
        t.apply(&changes("SET work_mem = '4MB'"));
        let sql = t.replay_sql();
        let statements = lex::statements(&sql);
        assert_eq!(statements.len(), 4, "{sql}");
        assert_eq!(statements[3].trim(), "SET work_mem = '4MB'", "{sql}");
        assert!(Settings::from_startup(&[("replication".into(), "true".into())]).is_err());
    }
}
