//! Session settings (SET, RESET, startup parameters) tracked per client so they survive
//! transaction pooling: replayed on whichever server connection the client gets next.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use crate::router::lex::{self, Tokens};

/// One change to session state made by a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `name` is set; `sql` is the statement that sets it, replayed verbatim.
    Set { name: String, sql: String },
    /// `RESET name` or `SET name TO DEFAULT`: back to the value the session started with.
    Reset(String),
    /// `RESET ALL`: every setting back to its session-start value, but the role and the
    /// session user, which it leaves alone.
    ResetAll,
    /// `DISCARD ALL`: the session user and role reset too, then `RESET ALL`.
    DiscardAll,
}

/// What a statement does to session state, beyond settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Effects {
    pub changes: Vec<Change>,
    /// DISCARD ALL / DEALLOCATE: server-side prepared statements may be gone.
    pub drops_prepared: bool,
    /// DISCARD ALL / DEALLOCATE [PREPARE] ALL: every named prepared statement on the server is
    /// gone, the proxy's shared ones too. (DISCARD PLANS keeps the statements.)
    pub drops_all: bool,
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
                    out.changes.push(Change::DiscardAll);
                    out.drops_prepared = true;
                    out.drops_all = true;
                }
            }
            Some("deallocate") => {
                out.drops_prepared = true;
                let mut what = tokens.next().map(str::to_ascii_lowercase);
                if what.as_deref() == Some("prepare") {
                    what = tokens.next().map(str::to_ascii_lowercase);
                }
                out.drops_all |= what.as_deref() == Some("all");
            }
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
        "time" => {
            // SET TIME ZONE LOCAL and SET TIME ZONE DEFAULT are RESET TimeZone.
            let value = tokens.nth(1).map(str::to_ascii_lowercase);
            Some(match (value.as_deref(), tokens.next()) {
                (Some("local" | "default"), None) => Change::Reset("timezone".into()),
                _ => set("timezone", sql),
            })
        }
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
            // SET name TO DEFAULT is RESET name (an unquoted DEFAULT only: 'default' is a value).
            let value = tokens.next();
            if value.is_some_and(|v| v.eq_ignore_ascii_case("default")) && tokens.next().is_none() {
                return Some(Change::Reset(name));
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

/// Quotes a value as a SQL string literal that means the same whatever
/// `standard_conforming_strings` is: one with a backslash is written as an escape string.
fn literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// Quotes a setting's name as an identifier: the name is the client's, and Postgres looks
/// settings up whatever their case.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What brings a server connection back to its defaults.
const RESET: &str = "SET SESSION AUTHORIZATION DEFAULT\n;RESET ALL";

/// Settings `RESET ALL` leaves alone (Postgres' `GUC_NO_RESET_ALL`): `DISCARD ALL` resets them,
/// as `SET SESSION AUTHORIZATION DEFAULT` does first.
const NOT_RESET_BY_ALL: [&str; 2] = ["role", "session_authorization"];

/// Printable ASCII, which Postgres takes as it is where it cleans a value (`application_name`).
fn is_plain(value: &str) -> bool {
    value.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// A setting the client started the session with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Startup {
    /// The name as the client wrote it.
    name: String,
    value: String,
}

impl Startup {
    fn sql(&self) -> String {
        format!("SET {} TO {}", ident(&self.name), literal(&self.value))
    }
}

/// A client's session settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    by_name: BTreeMap<String, String>,
    /// The settings of the startup packet and its `options`, by lower-case name: the values
    /// `RESET` goes back to. A server connection's own are its defaults, so these are set again
    /// after a client's RESET there.
    startup: BTreeMap<String, Startup>,
    /// Every startup setting in the order Postgres applies them, those a later one overrides
    /// too: each must be valid for the login to be.
    applied: Vec<Startup>,
    fingerprint: u64,
}

impl Settings {
    /// Settings from the startup packet. `user`, `database` and protocol options are not settings.
    /// Postgres applies the `-c` entries of `options` first and the other parameters after
    /// them, so a parameter sent both ways takes the plain parameter's value.
    ///
    /// # Errors
    /// Startup options Tessera cannot honour (`replication`, unparsable `options`).
    pub fn from_startup(params: &[(String, String)]) -> Result<Settings, String> {
        let mut options = Vec::new();
        let mut plain = Vec::new();
        for (name, value) in params {
            match name.as_str() {
                "user" | "database" => {}
                "replication" => return Err("replication connections are not supported".into()),
                "options" => options.extend(parse_options(value)?),
                n if n.starts_with("_pq_.") => {}
                n => plain.push((n.to_string(), value.clone())),
            }
        }
        let mut settings = Settings::default();
        for (name, value) in options.into_iter().chain(plain) {
            let startup = Startup { name, value };
            settings
                .by_name
                .insert(startup.name.to_ascii_lowercase(), startup.sql());
            settings
                .startup
                .insert(startup.name.to_ascii_lowercase(), startup.clone());
            settings.applied.push(startup);
        }
        settings.refingerprint();
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
                Change::Reset(name) => match self.startup.get(name) {
                    Some(startup) => {
                        self.by_name.insert(name.clone(), startup.sql());
                    }
                    None => {
                        self.by_name.remove(name);
                    }
                },
                Change::ResetAll => {
                    let kept: Vec<(String, String)> = NOT_RESET_BY_ALL
                        .iter()
                        .filter_map(|n| self.by_name.remove_entry(*n))
                        .collect();
                    self.by_name = self.startup_sql();
                    self.by_name.extend(kept);
                }
                Change::DiscardAll => self.by_name = self.startup_sql(),
            }
        }
        self.refingerprint();
    }

    fn startup_sql(&self) -> BTreeMap<String, String> {
        self.startup
            .iter()
            .map(|(name, s)| (name.clone(), s.sql()))
            .collect()
    }

    fn refingerprint(&mut self) {
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

    /// The statements that set the startup settings on a server connection as Postgres does
    /// at login (each in turn, after the connection's own are reset as a replay does), then
    /// read back `names` (`current_setting`, in the form ParameterStatus reports) as one row.
    pub fn status_sql(&self, names: &[String]) -> String {
        let mut sql = String::from(RESET);
        for startup in &self.applied {
            sql.push_str("\n;");
            sql.push_str(&startup.sql());
        }
        let columns: Vec<String> = names
            .iter()
            .map(|n| format!("pg_catalog.current_setting({})", literal(n)))
            .collect();
        sql.push_str("\n;SELECT ");
        sql.push_str(&columns.join(", "));
        sql
    }

    /// What decides the values a server reports at login for these startup settings, as a
    /// cache key. A plain `application_name` is left out: it is reported as sent
    /// ([`Settings::plain_application_name`]), and is often different on every connection.
    pub fn status_key(&self) -> String {
        let plain = self.plain_application_name().is_some();
        let mut key = String::new();
        for startup in &self.applied {
            let name = &startup.name;
            // Any plain name is valid: one overridden by the plain one changes nothing.
            if !(plain && name.eq_ignore_ascii_case("application_name") && is_plain(&startup.value))
            {
                key.push_str(&startup.sql());
                key.push('\n');
            }
        }
        key
    }

    /// The startup `application_name`, if Postgres reports it as sent: printable ASCII (it
    /// replaces any other byte).
    pub fn plain_application_name(&self) -> Option<&str> {
        let value = &self.startup.get("application_name")?.value;
        is_plain(value).then_some(value.as_str())
    }

    /// The startup settings `changes` leave reset (their last change a RESET, `RESET ALL` or
    /// `DISCARD ALL`). A server connection resets them to its own defaults, not to this
    /// client's startup values: those have to be set again after.
    fn restored(&self, changes: &[Change]) -> Vec<&Startup> {
        if self.startup.is_empty() {
            return Vec::new();
        }
        let mut reset = BTreeSet::new();
        for change in changes {
            match change {
                Change::Set { name, .. } => {
                    reset.remove(name.as_str());
                }
                Change::Reset(name) => {
                    if self.startup.contains_key(name) {
                        reset.insert(name.as_str());
                    }
                }
                Change::ResetAll => reset.extend(
                    self.startup
                        .keys()
                        .map(String::as_str)
                        .filter(|n| !NOT_RESET_BY_ALL.contains(n)),
                ),
                Change::DiscardAll => reset.extend(self.startup.keys().map(String::as_str)),
            }
        }
        reset.iter().map(|name| &self.startup[*name]).collect()
    }

    /// The statements (`SET`, one per setting) that set back the startup values of what
    /// `changes` reset, if any.
    pub fn restore_statements(&self, changes: &[Change]) -> Vec<String> {
        self.restored(changes).iter().map(|s| s.sql()).collect()
    }

    /// Whether `name` (as ParameterStatus spells it) is a setting the client started with.
    pub fn is_startup(&self, name: &str) -> bool {
        self.startup.contains_key(&name.to_ascii_lowercase())
    }

    /// As [`Settings::restore_statements`], as one statement, for the extended protocol (whose Parse
    /// takes one): a `SELECT` of `set_config` calls, which set as `SET` does.
    pub fn restore_select(&self, changes: &[Change]) -> Option<String> {
        let restored = self.restored(changes);
        (!restored.is_empty()).then(|| {
            let calls: Vec<String> = restored
                .iter()
                .map(|s| {
                    format!(
                        "pg_catalog.set_config({}, {}, false)",
                        literal(&s.name),
                        literal(&s.value)
                    )
                })
                .collect();
            format!("SELECT {}", calls.join(", "))
        })
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
        assert_eq!(changes("discard all"), vec![Change::DiscardAll]);
        // SET ... TO DEFAULT is a RESET; a quoted 'default' is a value.
        for reset in [
            "SET TimeZone TO DEFAULT",
            "set session timezone = default",
            "SET TIME ZONE LOCAL",
            "SET TIME ZONE DEFAULT",
        ] {
            assert_eq!(
                changes(reset),
                vec![Change::Reset("timezone".into())],
                "{reset}"
            );
        }
        assert!(matches!(
            changes("SET application_name TO 'default'")[0],
            Change::Set { .. }
        ));
        assert_eq!(
            changes("reset search_path"),
            vec![Change::Reset("search_path".into())]
        );
        assert_eq!(changes("select 1; set a = 1").len(), 1);
        assert!(changes("select 'set a = 1'").is_empty());
        assert!(effects("DISCARD ALL").drops_prepared);
        assert!(effects("deallocate all").drops_prepared);
        assert!(effects("DISCARD ALL").drops_all);
        assert!(effects("deallocate prepare ALL").drops_all);
        assert!(!effects("DEALLOCATE s1").drops_all);
        // DISCARD PLANS keeps the statements (their plans are made again).
        assert!(!effects("DISCARD PLANS").drops_prepared);
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
        assert!(sql.contains("SET \"application_name\" TO 'it''s'"), "{sql}");
        assert!(sql.contains("SET \"search_path\" TO 'a b'"), "{sql}");
        assert!(sql.contains("SET \"work_mem\" TO '4MB'"), "{sql}");
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

    fn startup(params: &[(&str, &str)]) -> Settings {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        Settings::from_startup(&params).expect("startup")
    }

    #[test]
    fn plain_parameters_win_over_options() {
        // Postgres applies `options` first.
        let s = startup(&[
            ("TimeZone", "UTC"),
            ("options", "-c timezone=Asia/Tokyo -c DateStyle=ISO"),
        ]);
        let sql = s.replay_sql();
        assert!(sql.contains("SET \"TimeZone\" TO 'UTC'"), "{sql}");
        assert!(!sql.contains("Asia/Tokyo"), "{sql}");
        assert!(sql.contains("SET \"datestyle\" TO 'ISO'"), "{sql}");
    }

    #[test]
    fn reset_goes_back_to_the_startup_value() {
        let mut s = startup(&[("TimeZone", "Asia/Tokyo"), ("application_name", "app")]);
        let at_start = s.clone();
        s.apply(&changes("SET TimeZone = 'UTC'"));
        s.apply(&changes("RESET TimeZone"));
        assert_eq!(s, at_start);
        s.apply(&changes("SET TimeZone = 'UTC'; SET work_mem = '1MB'"));
        s.apply(&changes("SET TIME ZONE DEFAULT; RESET work_mem"));
        assert_eq!(s, at_start);
        s.apply(&changes("SET TimeZone = 'UTC'; SET work_mem = '1MB'"));
        s.apply(&changes("RESET ALL"));
        assert_eq!(s, at_start);
        s.apply(&changes("SET application_name = 'x'"));
        s.apply(&changes("DISCARD ALL"));
        assert_eq!(s, at_start);
        assert_ne!(s.fingerprint(), 0);
    }

    #[test]
    fn reset_all_leaves_the_role() {
        let mut s = Settings::default();
        s.apply(&changes("SET ROLE reader; SET work_mem = '1MB'"));
        s.apply(&changes("RESET ALL"));
        assert_eq!(s.replay_sql(), format!("{RESET}\n;SET ROLE reader"));
        s.apply(&changes("DISCARD ALL"));
        assert_eq!(s.fingerprint(), 0);
    }

    #[test]
    fn restore_sets_back_what_the_last_change_reset() {
        let s = startup(&[("TimeZone", "Asia/Tokyo"), ("options", "-c role=reader")]);
        let restore = |sql: &str| s.restore_statements(&changes(sql));
        assert!(restore("RESET work_mem").is_empty());
        assert_eq!(
            restore("RESET TimeZone"),
            vec!["SET \"TimeZone\" TO 'Asia/Tokyo'"]
        );
        // Set again after the reset: nothing to restore.
        assert!(restore("RESET ALL; SET TimeZone = 'UTC'").is_empty());
        // RESET ALL leaves the role; DISCARD ALL does not.
        assert_eq!(restore("RESET ALL").len(), 1);
        assert_eq!(restore("DISCARD ALL").len(), 2);
        assert!(s.is_startup("TimeZone"));
        assert_eq!(
            s.restore_select(&changes("RESET ALL")).as_deref(),
            Some("SELECT pg_catalog.set_config('TimeZone', 'Asia/Tokyo', false)")
        );
        assert!(
            Settings::default()
                .restore_statements(&changes("RESET ALL"))
                .is_empty()
        );
    }

    #[test]
    fn literals_survive_either_string_syntax() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\b'c"), "E'a\\\\b''c'");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn plain_application_names_stay_out_of_the_status_key() {
        let a = startup(&[("application_name", "worker 1"), ("TimeZone", "UTC")]);
        let b = startup(&[("application_name", "worker 2"), ("TimeZone", "UTC")]);
        assert_eq!(a.status_key(), b.status_key());
        assert_eq!(a.plain_application_name(), Some("worker 1"));
        let odd = startup(&[("application_name", "caf\u{e9}")]);
        assert_eq!(odd.plain_application_name(), None);
        assert_ne!(odd.status_key(), "");
        // Every startup setting is applied in Postgres' order, an overridden one too.
        let both = startup(&[("TimeZone", "UTC"), ("options", "-c TimeZone=bad")]);
        let sql = both.status_sql(&["TimeZone".into()]);
        let bad = sql.find("'bad'").expect("the options entry");
        assert!(sql[bad..].contains("'UTC'"), "{sql}");
        assert!(
            sql.ends_with("SELECT pg_catalog.current_setting('TimeZone')"),
            "{sql}"
        );
        assert_ne!(
            both.status_key(),
            startup(&[("TimeZone", "UTC")]).status_key()
        );
    }
}
