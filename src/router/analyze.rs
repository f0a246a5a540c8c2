//! Statement analysis: what a SQL text does and where its shard keys are, computed once per
//! distinct text (parameters stay symbolic as `$n`) and cached by the router.
//!
//! Trivial statements (BEGIN, COMMIT, SET, SHOW...) are classified by keyword; everything else
//! goes through sqlparser. Anything the analysis cannot prove safe is marked so the router fails
//! closed: primary, and an error rather than a guess when shards are involved.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    BinaryOperator, CastKind, Expr, FromTable, GroupByExpr, InTarget, ObjectName, ObjectNamePart,
    Query, Select, SetExpr, Statement, TableFactor, TableObject, TableWithJoins, UnaryOperator,
    Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::lex;

/// What the router knows about the map's tables.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    /// Sharded table -> key column (both lowercase).
    pub sharded: BTreeMap<String, String>,
    pub reference: BTreeSet<String>,
}

impl Schema {
    /// The sharded and reference tables of a map, lowercased as unquoted SQL names are.
    pub fn from_config(config: &crate::config::Config) -> Schema {
        Schema {
            sharded: config
                .sharding
                .tables
                .iter()
                .map(|(t, c)| (t.to_ascii_lowercase(), c.to_ascii_lowercase()))
                .collect(),
            reference: config
                .sharding
                .reference_tables
                .iter()
                .map(|t| t.to_ascii_lowercase())
                .collect(),
        }
    }
}

/// A shard-key value as written in SQL: a constant, or the `n`-th bind parameter (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Literal(String),
    /// A NULL literal: matches no row, owns no shard.
    Null,
    Param(usize),
    /// `key = ANY($n)`: every element of an array parameter.
    AnyParam(usize),
}

/// Where the keys of a predicate point: evaluated against bind values at plan time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExpr {
    /// Nothing known: every shard.
    All,
    Keys(Vec<KeySource>),
    And(Vec<KeyExpr>),
    Or(Vec<KeyExpr>),
}

/// Transaction control statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxCommand {
    Begin {
        read_only: bool,
    },
    Commit,
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO: stay on the connections the transaction holds.
    Savepoint,
    /// PREPARE TRANSACTION / COMMIT PREPARED / ROLLBACK PREPARED: Tessera's own business later.
    TwoPhase,
}

/// What a statement needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// No table involved (`SELECT 1`, `SHOW`, `SET`): any one shard.
    AnyShard,
    /// Transaction control.
    Tx(TxCommand),
    /// Reads only reference (or unlisted) tables: one shard. Writes to them: every shard.
    Reference,
    /// Touches sharded tables; `table` names one, `keys` says which shards.
    Sharded { table: String, keys: KeyExpr },
    /// INSERT into a sharded table: one key per VALUES row.
    Insert { table: String, rows: Vec<KeySource> },
    /// DDL and utility commands: every shard, one reply.
    Broadcast,
    /// COPY of a sharded table (in: rows split by key; out: every shard's rows), or COPY FROM
    /// into a table copied on every shard (every row to every shard).
    Copy(Arc<CopySpec>),
    /// Several statements in one query, each with its own keys (and whether it writes): they
    /// run together only if their keys all point at one shard, known at plan time.
    Multi(Vec<(Route, bool)>),
    /// Cannot be run correctly across shards (the reason names the construct).
    Unsupported(String),
}

/// What the proxy must know to run a COPY across shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    pub table: String,
    /// COPY TO STDOUT (else FROM STDIN).
    pub to: bool,
    /// Position of the shard key in each row; `None`: a table copied on every shard.
    pub key: Option<usize>,
    pub csv: bool,
    pub delimiter: u8,
    pub quote: u8,
    pub escape: u8,
    pub header: bool,
    /// How NULL is written (`\N` in text, the empty string in CSV).
    pub null: String,
}

/// The analysis of one SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub route: Route,
    /// Writes data, locks rows, or calls a function known to write: primaries only.
    pub writes: bool,
    /// May run on a replica (a plain read); false for anything the parser could not classify.
    pub replica_ok: bool,
    /// `/* tessera: primary */` hint present.
    pub force_primary: bool,
    /// Why the result of several shards cannot simply be concatenated (ORDER BY, LIMIT, ...).
    pub needs_merge: Option<String>,
    /// A short description for `tessera route` and logs.
    pub reason: Arc<str>,
    /// The text was understood by the parser (or classified by keyword).
    pub parsed: bool,
}

impl Analysis {
    /// Planning may need the statement's text: to rewrite it for a merge, or to split a
    /// multi-row INSERT by shard.
    pub fn needs_text(&self) -> bool {
        self.needs_merge.is_some()
            || matches!(&self.route, Route::Insert { rows, .. } if rows.len() > 1)
    }

    fn new(route: Route, writes: bool, reason: impl Into<String>) -> Analysis {
        Analysis {
            route,
            writes,
            replica_ok: !writes,
            force_primary: false,
            needs_merge: None,
            reason: Arc::from(reason.into()),
            parsed: true,
        }
    }
}

/// Functions that write or take locks: a SELECT calling them must run on a primary.
const WRITING_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_notify",
    "set_config",
    "txid_current",
    "pg_current_xact_id",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_sleep_for",
    "lo_create",
    "lo_import",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "dblink_exec",
];

/// Aggregates whose per-shard results cannot be concatenated.
pub(super) const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "every",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "xmlagg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "mode",
    "percentile_cont",
    "percentile_disc",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "range_agg",
    "range_intersect_agg",
    "any_value",
];

/// Analyzes a whole query string (possibly several statements).
pub fn analyze(sql: &str, schema: &Schema) -> Analysis {
    let force_primary = has_primary_hint(sql);
    let statements = lex::statements(sql);
    let mut analysis = match statements.as_slice() {
        [] => Analysis::new(Route::AnyShard, false, "empty query"),
        [one] => analyze_one(one, schema),
        many => combine(many.iter().map(|s| analyze_one(s, schema)).collect()),
    };
    if force_primary {
        analysis.force_primary = true;
        analysis.replica_ok = false;
    }
    analysis
}

fn has_primary_hint(sql: &str) -> bool {
    // Cheap first: most statements carry no comment at all.
    if !sql.contains("tessera") {
        return false;
    }
    let compact: String = sql
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    compact.contains("/*tessera:primary*/")
}

/// Several statements in one Query: they run as one implicit transaction, so they must share
/// one target.
fn combine(parts: Vec<Analysis>) -> Analysis {
    let writes = parts.iter().any(|a| a.writes);
    let replica_ok = parts.iter().all(|a| a.replica_ok);
    if let Some(bad) = parts
        .iter()
        .find(|a| matches!(a.route, Route::Unsupported(_)))
    {
        return bad.clone();
    }
    let needs_merge = parts.iter().find_map(|a| a.needs_merge.clone());
    let routes: Vec<&Route> = parts
        .iter()
        .map(|a| &a.route)
        .filter(|r| !matches!(r, Route::AnyShard | Route::Tx(_)))
        .collect();
    let route = match routes.as_slice() {
        [] => Route::AnyShard,
        [first, rest @ ..] if rest.iter().all(|r| r == first) => (*first).clone(),
        all if all
            .iter()
            .all(|r| matches!(r, Route::Broadcast | Route::Reference))
            && writes =>
        {
            Route::Broadcast
        }
        all if all.iter().all(|r| {
            matches!(
                r,
                Route::Sharded { .. } | Route::Insert { .. } | Route::Reference
            )
        }) =>
        {
            Route::Multi(
                parts
                    .iter()
                    .filter(|a| !matches!(a.route, Route::AnyShard | Route::Tx(_)))
                    .map(|a| (a.route.clone(), a.writes))
                    .collect(),
            )
        }
        _ => Route::Unsupported(
            "a multi-statement query whose statements target different shards".into(),
        ),
    };
    Analysis {
        route,
        writes,
        replica_ok: replica_ok && !writes,
        force_primary: false,
        needs_merge,
        reason: Arc::from("multi-statement query"),
        parsed: parts.iter().all(|a| a.parsed),
    }
}

fn analyze_one(stmt: &str, schema: &Schema) -> Analysis {
    let mut words = lex::Tokens::new(stmt);
    let first = words
        .next()
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let second = words
        .next()
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let tx = |cmd| Analysis::new(Route::Tx(cmd), false, "transaction control");
    match first.as_str() {
        "begin" | "start" => {
            let read_only = stmt.to_ascii_lowercase().contains("read only");
            return tx(TxCommand::Begin { read_only });
        }
        "commit" | "end" if second == "prepared" => return tx(TxCommand::TwoPhase),
        "commit" | "end" => return tx(TxCommand::Commit),
        "rollback" | "abort" if second == "prepared" => return tx(TxCommand::TwoPhase),
        "rollback" | "abort" => {
            // Tokens, not words: a comment may say "to" too.
            let to_savepoint = lex::Tokens::new(stmt).any(|w| w.eq_ignore_ascii_case("to"));
            return tx(if to_savepoint {
                TxCommand::Savepoint
            } else {
                TxCommand::Rollback
            });
        }
        "prepare" if second == "transaction" => return tx(TxCommand::TwoPhase),
        "savepoint" | "release" => return tx(TxCommand::Savepoint),
        "set" if second == "transaction" || second == "local" || second == "constraints" => {
            let read_only = stmt.to_ascii_lowercase().contains("read only");
            let mut a = Analysis::new(Route::AnyShard, false, "transaction setting");
            a.replica_ok = read_only;
            return a;
        }
        "set" | "reset" | "discard" | "deallocate" | "listen" | "unlisten" | "load" => {
            let mut a = Analysis::new(Route::AnyShard, false, "session command");
            a.replica_ok = false;
            return a;
        }
        "show" => return Analysis::new(Route::AnyShard, false, "SHOW"),
        "create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "truncate" | "vacuum"
        | "analyze" | "cluster" | "reindex" | "refresh" | "security" | "import" | "checkpoint" => {
            // A TEMP table lives on one session's connection: creating it everywhere is
            // harmless, but data in it would not follow the client; keep the broadcast rule.
            return Analysis::new(
                Route::Broadcast,
                true,
                "DDL and maintenance run on every shard",
            );
        }
        "notify" => return Analysis::new(Route::AnyShard, true, "NOTIFY"),
        "do" | "call" => {
            return Analysis::new(
                Route::Unsupported(format!(
                    "{} on a sharded database (the proxy cannot see what it touches)",
                    first.to_uppercase()
                )),
                true,
                "procedural code",
            );
        }
        _ => {}
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, stmt) {
        Ok(parsed) => match parsed.as_slice() {
            [statement] => analyze_statement(statement, schema),
            _ => unparsable(&first, schema, "statement split differently by the parser"),
        },
        Err(e) => unparsable(&first, schema, &e.to_string()),
    }
}

/// A statement sqlparser cannot read: primary, and only where no sharded table can be hurt.
fn unparsable(first: &str, schema: &Schema, why: &str) -> Analysis {
    let reason = format!("not understood by the router ({why})");
    let route = if schema.sharded.is_empty() {
        Route::AnyShard
    } else {
        Route::Unsupported(format!(
            "a {} statement the router cannot parse, on a database with sharded tables",
            first.to_uppercase()
        ))
    };
    let mut a = Analysis::new(route, true, reason);
    a.replica_ok = false;
    a.parsed = false;
    a
}

/// Tables and aliases in scope, for resolving column references.
#[derive(Debug, Default)]
struct Scope {
    /// alias or table name -> table name (lowercase).
    names: BTreeMap<String, String>,
}

impl Scope {
    fn add_from(&mut self, from: &[TableWithJoins]) {
        for twj in from {
            self.add_factor(&twj.relation);
            for join in &twj.joins {
                self.add_factor(&join.relation);
            }
        }
    }

    fn add_factor(&mut self, factor: &TableFactor) {
        if let TableFactor::Table { name, alias, .. } = factor {
            let table = table_name(name);
            if let Some(alias) = alias {
                self.names
                    .insert(alias.name.value.to_ascii_lowercase(), table.clone());
            }
            self.names.insert(table.clone(), table);
        }
    }
}

fn table_name(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => {
            if ident.quote_style.is_some() {
                ident.value.clone()
            } else {
                ident.value.to_ascii_lowercase()
            }
        }
        _ => String::new(),
    }
}

/// Walks a statement for the facts that do not depend on its shape.
#[derive(Default)]
struct Facts {
    tables: BTreeSet<String>,
    /// Tables read inside a subquery, derived table or CTE (a query nested in another).
    nested_tables: BTreeSet<String>,
    depth: usize,
    queries: usize,
    statements: usize,
    writing_function: Option<String>,
    aggregate: Option<String>,
    window: bool,
}

impl Visitor for Facts {
    type Break = ();

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let name = table_name(relation);
        if self.depth > 1 {
            self.nested_tables.insert(name.clone());
        }
        self.tables.insert(name);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.queries += 1;
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<()> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, _statement: &Statement) -> ControlFlow<()> {
        self.statements += 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let name = table_name(&f.name);
            if f.over.is_some() {
                self.window = true;
            }
            if WRITING_FUNCTIONS.contains(&name.as_str()) && self.writing_function.is_none() {
                self.writing_function = Some(name.clone());
            }
            if AGGREGATES.contains(&name.as_str()) && f.over.is_none() && self.aggregate.is_none() {
                self.aggregate = Some(name);
            }
        }
        ControlFlow::Continue(())
    }
}

fn analyze_statement(statement: &Statement, schema: &Schema) -> Analysis {
    let mut facts = Facts::default();
    let _ = statement.visit(&mut facts);
    let sharded: Vec<&String> = facts
        .tables
        .iter()
        .filter(|t| schema.sharded.contains_key(*t))
        .collect();
    let nested_dml = facts.statements > 1;
    match statement {
        Statement::Query(query) => analyze_query(query, schema, &facts, &sharded, nested_dml),
        Statement::Insert(insert) => {
            let table = match &insert.table {
                TableObject::TableName(name) => table_name(name),
                _ => String::new(),
            };
            let Some(key) = schema.sharded.get(&table) else {
                return write_elsewhere(&sharded, &facts, "INSERT");
            };
            if sharded.len() > 1 || facts.queries > 1 {
                return unsupported("INSERT into a sharded table from a query (INSERT ... SELECT)");
            }
            let Some(pos) = insert
                .columns
                .iter()
                .position(|c| table_name(c).eq_ignore_ascii_case(key))
            else {
                let what = if insert.columns.is_empty() {
                    format!(
                        "INSERT into sharded table {table} without a column list (name the columns, including {key})"
                    )
                } else {
                    format!("INSERT into sharded table {table} without its shard key {key}")
                };
                return unsupported(&what);
            };
            let Some(source) = &insert.source else {
                return unsupported("INSERT into a sharded table without VALUES");
            };
            let SetExpr::Values(values) = source.body.as_ref() else {
                return unsupported("INSERT into a sharded table from a query (INSERT ... SELECT)");
            };
            let mut rows = Vec::with_capacity(values.rows.len());
            for row in &values.rows {
                match row.get(pos).and_then(constant) {
                    Some(k) => rows.push(k),
                    None => {
                        return unsupported(&format!(
                            "INSERT into {table} whose shard key {key} is not a constant or parameter"
                        ));
                    }
                }
            }
            let mut a = Analysis::new(Route::Insert { table, rows }, true, "INSERT by shard key");
            a.replica_ok = false;
            a
        }
        Statement::Update(update) => {
            let mut scope = Scope::default();
            scope.add_from(std::slice::from_ref(&update.table));
            if let Some(from) = &update.from {
                let tables = match from {
                    sqlparser::ast::UpdateTableFromKind::BeforeSet(t)
                    | sqlparser::ast::UpdateTableFromKind::AfterSet(t) => t,
                };
                scope.add_from(tables);
            }
            let target = match &update.table.relation {
                TableFactor::Table { name, .. } => table_name(name),
                _ => String::new(),
            };
            if let Some(key) = schema.sharded.get(&target) {
                let sets_key = update.assignments.iter().any(|a| match &a.target {
                    sqlparser::ast::AssignmentTarget::ColumnName(c) => {
                        table_name(c).eq_ignore_ascii_case(key)
                    }
                    sqlparser::ast::AssignmentTarget::Tuple(cols) => {
                        cols.iter().any(|c| table_name(c).eq_ignore_ascii_case(key))
                    }
                });
                if sets_key {
                    return unsupported(&format!(
                        "an UPDATE that changes the shard key {target}.{key}"
                    ));
                }
            }
            sharded_dml(
                schema,
                &scope,
                &sharded,
                &facts,
                update.selection.as_ref(),
                nested_dml,
                "UPDATE",
            )
        }
        Statement::Delete(delete) => {
            let mut scope = Scope::default();
            let from = match &delete.from {
                FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
            };
            scope.add_from(from);
            if let Some(using) = &delete.using {
                scope.add_from(using);
            }
            sharded_dml(
                schema,
                &scope,
                &sharded,
                &facts,
                delete.selection.as_ref(),
                nested_dml,
                "DELETE",
            )
        }
        Statement::Copy {
            source,
            to,
            target,
            options,
            legacy_options,
            ..
        } => analyze_copy(schema, source, *to, target, options, legacy_options),
        Statement::Explain { .. } | Statement::ExplainTable { .. } => {
            let mut a = Analysis::new(Route::AnyShard, false, "EXPLAIN runs on one shard");
            a.replica_ok = false;
            if !sharded.is_empty() {
                a.route = Route::Unsupported("EXPLAIN of a statement on sharded tables".into());
            }
            a
        }
        _ => {
            // Anything else the parser knows but we do not classify: primary, and every shard
            // only if it touches no sharded table.
            let mut a = Analysis::new(
                if sharded.is_empty() {
                    Route::AnyShard
                } else {
                    Route::Unsupported("this statement on sharded tables".into())
                },
                true,
                "other statement",
            );
            a.replica_ok = false;
            a
        }
    }
}

fn analyze_copy(
    schema: &Schema,
    source: &sqlparser::ast::CopySource,
    to: bool,
    target: &sqlparser::ast::CopyTarget,
    options: &[sqlparser::ast::CopyOption],
    legacy: &[sqlparser::ast::CopyLegacyOption],
) -> Analysis {
    use sqlparser::ast::{
        CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget,
    };
    let (table, columns) = match source {
        CopySource::Table {
            table_name: name,
            columns,
        } => (table_name(name), columns),
        CopySource::Query(query) => {
            let mut facts = Facts::default();
            let _ = query.visit(&mut facts);
            if facts.tables.iter().any(|t| schema.sharded.contains_key(t)) {
                return unsupported("COPY (query) of sharded tables");
            }
            let mut a = Analysis::new(Route::Reference, false, "COPY TO of unsharded tables");
            a.replica_ok = false;
            return a;
        }
    };
    let key = schema.sharded.get(&table);
    let standard = matches!(target, CopyTarget::Stdin | CopyTarget::Stdout);
    if key.is_none() && to {
        let mut a = Analysis::new(Route::Reference, false, "COPY TO of an unsharded table");
        a.replica_ok = false;
        return a;
    }
    if !standard {
        return unsupported("COPY to or from a file or program on a sharded database");
    }
    let mut spec = CopySpec {
        table: table.clone(),
        to,
        key: None,
        csv: false,
        delimiter: b'\t',
        quote: b'"',
        escape: b'"',
        header: false,
        null: "\\N".into(),
    };
    let mut delimiter = None;
    let mut null = None;
    let byte = |c: char| u8::try_from(u32::from(c)).ok().filter(u8::is_ascii);
    for option in options {
        match option {
            CopyOption::Format(f) => match f.value.to_ascii_lowercase().as_str() {
                "csv" => spec.csv = true,
                "text" => spec.csv = false,
                _ => return unsupported("COPY in binary format across shards"),
            },
            CopyOption::Delimiter(c) => delimiter = byte(*c),
            CopyOption::Null(n) => null = Some(n.clone()),
            CopyOption::Header(h) => spec.header = *h,
            CopyOption::Quote(c) => spec.quote = byte(*c).unwrap_or(0),
            CopyOption::Escape(c) => spec.escape = byte(*c).unwrap_or(0),
            CopyOption::Freeze(_)
            | CopyOption::Encoding(_)
            | CopyOption::ForceNotNull(_)
            | CopyOption::ForceNull(_)
            | CopyOption::ForceQuote(_) => {}
        }
    }
    for option in legacy {
        match option {
            CopyLegacyOption::Binary => return unsupported("COPY in binary format across shards"),
            CopyLegacyOption::Delimiter(c) => delimiter = byte(*c),
            CopyLegacyOption::Null(n) => null = Some(n.clone()),
            CopyLegacyOption::Csv(csv) => {
                spec.csv = true;
                for o in csv {
                    match o {
                        CopyLegacyCsvOption::Header => spec.header = true,
                        CopyLegacyCsvOption::Quote(c) => spec.quote = byte(*c).unwrap_or(0),
                        CopyLegacyCsvOption::Escape(c) => spec.escape = byte(*c).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => return unsupported("this COPY option across shards"),
        }
    }
    if spec.csv {
        spec.delimiter = b',';
        spec.null = String::new();
    }
    if let Some(d) = delimiter {
        spec.delimiter = d;
    } else if options
        .iter()
        .any(|o| matches!(o, CopyOption::Delimiter(_)))
    {
        return unsupported("a non-ASCII COPY delimiter across shards");
    }
    if let Some(n) = null {
        spec.null = n;
    }
    if spec.quote == 0 || spec.escape == 0 {
        return unsupported("a non-ASCII COPY quote or escape character across shards");
    }
    if let Some(key) = key
        && !to
    {
        let Some(pos) = columns
            .iter()
            .position(|c| c.value.eq_ignore_ascii_case(key))
        else {
            return unsupported(&if columns.is_empty() {
                format!(
                    "COPY into sharded table {table} without a column list (name the columns, including {key})"
                )
            } else {
                format!("COPY into sharded table {table} without its shard key {key}")
            });
        };
        spec.key = Some(pos);
    }
    let reason = match (to, key.is_some()) {
        (true, _) => "COPY TO of a sharded table: every shard's rows",
        (false, true) => "COPY FROM into a sharded table: rows split by shard key",
        (false, false) => "COPY FROM into a table copied on every shard",
    };
    let mut a = Analysis::new(Route::Copy(Arc::new(spec)), !to, reason);
    a.replica_ok = false;
    a
}

fn unsupported(what: &str) -> Analysis {
    let mut a = Analysis::new(Route::Unsupported(what.to_string()), true, "unsupported");
    a.replica_ok = false;
    a
}

/// A write to a table that is not sharded.
fn write_elsewhere(sharded: &[&String], facts: &Facts, verb: &str) -> Analysis {
    if !sharded.is_empty() {
        return unsupported(&format!(
            "{verb} into a reference table from a sharded table"
        ));
    }
    let _ = facts;
    let mut a = Analysis::new(
        Route::Reference,
        true,
        format!("{verb} on a reference table: every shard"),
    );
    a.replica_ok = false;
    a
}

fn sharded_dml(
    schema: &Schema,
    scope: &Scope,
    sharded: &[&String],
    facts: &Facts,
    selection: Option<&Expr>,
    nested_dml: bool,
    verb: &str,
) -> Analysis {
    if sharded.is_empty() {
        return write_elsewhere(sharded, facts, verb);
    }
    if nested_dml {
        return unsupported(&format!(
            "{verb} with a data-modifying subquery on sharded tables"
        ));
    }
    if facts.queries > 0 {
        return unsupported(&format!("{verb} with a subquery on sharded tables"));
    }
    let table = sharded[0].clone();
    let keys = match colocated_keys(schema, scope, sharded, selection, &[]) {
        Ok(keys) => keys,
        Err(why) => return unsupported(&why),
    };
    let mut a = Analysis::new(
        Route::Sharded { table, keys },
        true,
        format!("{verb} by shard key"),
    );
    a.replica_ok = false;
    a
}

fn analyze_query(
    query: &Query,
    schema: &Schema,
    facts: &Facts,
    sharded: &[&String],
    nested_dml: bool,
) -> Analysis {
    let locking = !query.locks.is_empty();
    let writes = locking || facts.writing_function.is_some() || nested_dml;
    let mut reason = String::from("read");
    if locking {
        reason = "locking read (FOR UPDATE/SHARE)".into();
    } else if let Some(f) = &facts.writing_function {
        reason = format!("calls {f}(), which writes");
    } else if nested_dml {
        reason = "data-modifying WITH".into();
    }
    let select = match query.body.as_ref() {
        SetExpr::Select(select) => Some(select.as_ref()),
        _ => None,
    };
    if let Some(select) = select
        && select.into.is_some()
    {
        return unsupported("SELECT INTO");
    }
    let route = if sharded.is_empty() {
        if facts.tables.is_empty() {
            Route::AnyShard
        } else {
            Route::Reference
        }
    } else if nested_dml {
        Route::Unsupported("a data-modifying WITH on sharded tables".into())
    } else if facts
        .nested_tables
        .iter()
        .any(|t| schema.sharded.contains_key(t))
    {
        // Subqueries and CTEs over reference tables read the same rows on every shard; over
        // a sharded table each shard would see only its part.
        Route::Unsupported("a subquery or CTE on sharded tables".into())
    } else if let Some(select) = select {
        let mut scope = Scope::default();
        scope.add_from(&select.from);
        let join_conditions = join_conditions(select);
        match colocated_keys(
            schema,
            &scope,
            sharded,
            select.selection.as_ref(),
            &join_conditions,
        ) {
            Ok(keys) => Route::Sharded {
                table: sharded[0].clone(),
                keys,
            },
            Err(why) => Route::Unsupported(why),
        }
    } else {
        Route::Unsupported("a set operation (UNION/INTERSECT/EXCEPT) on sharded tables".into())
    };
    let mut a = Analysis::new(route, writes, reason);
    a.needs_merge = merge_need(query, select, facts);
    a
}

/// Why rows from several shards could not just be concatenated.
fn merge_need(query: &Query, select: Option<&Select>, facts: &Facts) -> Option<String> {
    if query.order_by.is_some() {
        return Some("ORDER BY".into());
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return Some("LIMIT/OFFSET".into());
    }
    if let Some(select) = select {
        if select.distinct.is_some() {
            return Some("DISTINCT".into());
        }
        match &select.group_by {
            GroupByExpr::Expressions(exprs, _) if exprs.is_empty() => {}
            _ => return Some("GROUP BY".into()),
        }
        if select.having.is_some() {
            return Some("HAVING".into());
        }
    }
    if let Some(agg) = &facts.aggregate {
        return Some(format!("aggregate {agg}()"));
    }
    if facts.window {
        return Some("window functions".into());
    }
    None
}

fn join_conditions(select: &Select) -> Vec<&Expr> {
    let mut out = Vec::new();
    for twj in &select.from {
        for join in &twj.joins {
            use sqlparser::ast::{JoinConstraint, JoinOperator as J};
            let constraint = match &join.join_operator {
                J::Join(c)
                | J::Inner(c)
                | J::Left(c)
                | J::LeftOuter(c)
                | J::Right(c)
                | J::RightOuter(c)
                | J::FullOuter(c) => Some(c),
                _ => None,
            };
            if let Some(JoinConstraint::On(expr)) = constraint {
                out.push(expr);
            }
        }
    }
    out
}

/// The key predicate of a statement on one or more sharded tables. Several sharded tables are
/// only allowed when their shard keys are equated (a co-located join), so a key of any of them
/// names the shard of all of them.
fn colocated_keys(
    schema: &Schema,
    scope: &Scope,
    sharded: &[&String],
    selection: Option<&Expr>,
    join_conditions: &[&Expr],
) -> Result<KeyExpr, String> {
    if sharded.len() > 1 {
        let mut linked: BTreeSet<&str> = BTreeSet::new();
        linked.insert(sharded[0]);
        let mut equalities = Vec::new();
        for expr in join_conditions.iter().copied().chain(selection) {
            collect_key_equalities(expr, schema, scope, &mut equalities);
        }
        // Grow the set of tables reachable through key equalities.
        loop {
            let before = linked.len();
            for (a, b) in &equalities {
                if linked.contains(a.as_str()) || linked.contains(b.as_str()) {
                    linked.insert(a);
                    linked.insert(b);
                }
            }
            if linked.len() == before {
                break;
            }
        }
        if let Some(other) = sharded.iter().find(|t| !linked.contains(t.as_str())) {
            return Err(format!(
                "a join of sharded tables {} and {other} that is not on their shard keys",
                sharded[0]
            ));
        }
    }
    Ok(selection.map_or(KeyExpr::All, |e| key_expr(e, schema, scope)))
}

fn collect_key_equalities(
    expr: &Expr,
    schema: &Schema,
    scope: &Scope,
    out: &mut Vec<(String, String)>,
) {
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            collect_key_equalities(left, schema, scope, out);
            collect_key_equalities(right, schema, scope, out);
        }
        Expr::Nested(inner) => collect_key_equalities(inner, schema, scope, out),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } => {
            if let (Some(a), Some(b)) = (
                key_column_of(left, schema, scope),
                key_column_of(right, schema, scope),
            ) && a != b
            {
                out.push((a, b));
            }
        }
        _ => {}
    }
}

/// Whether `expr` is the shard-key column of a sharded table of `from`.
pub(super) fn is_shard_key(expr: &Expr, schema: &Schema, from: &[TableWithJoins]) -> bool {
    let mut scope = Scope::default();
    scope.add_from(from);
    key_column_of(expr, schema, &scope).is_some()
}

/// If `expr` is the shard-key column of a sharded table in scope, that table.
fn key_column_of(expr: &Expr, schema: &Schema, scope: &Scope) -> Option<String> {
    match expr {
        Expr::Nested(inner) => key_column_of(inner, schema, scope),
        Expr::Identifier(col) => {
            let col = col.value.to_ascii_lowercase();
            let mut owners = scope
                .names
                .values()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|t| schema.sharded.get(*t) == Some(&col));
            let owner = owners.next()?;
            owners.next().is_none().then(|| owner.clone())
        }
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
            let col = parts[parts.len() - 1].value.to_ascii_lowercase();
            let qualifier = parts[parts.len() - 2].value.to_ascii_lowercase();
            let table = scope.names.get(&qualifier)?;
            (schema.sharded.get(table) == Some(&col)).then(|| table.clone())
        }
        _ => None,
    }
}

/// The keys a WHERE clause pins, as a tree evaluated at plan time.
fn key_expr(expr: &Expr, schema: &Schema, scope: &Scope) -> KeyExpr {
    match expr {
        Expr::Nested(inner) => key_expr(inner, schema, scope),
        Expr::BinaryOp { left, op, right } => match op {
            BinaryOperator::And => KeyExpr::And(vec![
                key_expr(left, schema, scope),
                key_expr(right, schema, scope),
            ]),
            BinaryOperator::Or => KeyExpr::Or(vec![
                key_expr(left, schema, scope),
                key_expr(right, schema, scope),
            ]),
            BinaryOperator::Eq => {
                let pairs = [(left, right), (right, left)];
                for (col, val) in pairs {
                    if key_column_of(col, schema, scope).is_some()
                        && let Some(k) = constant(val)
                    {
                        return KeyExpr::Keys(vec![k]);
                    }
                }
                KeyExpr::All
            }
            _ => KeyExpr::All,
        },
        Expr::In {
            expr,
            target: InTarget::List(list),
            negated: false,
            ..
        } if key_column_of(expr, schema, scope).is_some() => {
            let keys: Option<Vec<KeySource>> = list.iter().map(constant).collect();
            keys.map_or(KeyExpr::All, KeyExpr::Keys)
        }
        Expr::AnyOp {
            left,
            compare_op: BinaryOperator::Eq,
            right,
            ..
        } if key_column_of(left, schema, scope).is_some() => match strip_cast(right) {
            Expr::Value(v) => match &v.value {
                Value::Placeholder(p) => param_index(p).map_or(KeyExpr::All, |n| {
                    KeyExpr::Keys(vec![KeySource::AnyParam(n)])
                }),
                _ => KeyExpr::All,
            },
            Expr::Array(array) => {
                let keys: Option<Vec<KeySource>> = array.elem.iter().map(constant).collect();
                keys.map_or(KeyExpr::All, KeyExpr::Keys)
            }
            _ => KeyExpr::All,
        },
        _ => KeyExpr::All,
    }
}

fn strip_cast(expr: &Expr) -> &Expr {
    match expr {
        Expr::Cast {
            kind: CastKind::DoubleColon | CastKind::Cast,
            expr,
            ..
        } => strip_cast(expr),
        Expr::Nested(inner) => strip_cast(inner),
        other => other,
    }
}

/// A constant usable as a shard key: a literal or a bind parameter (casts allowed).
fn constant(expr: &Expr) -> Option<KeySource> {
    match strip_cast(expr) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(KeySource::Literal(n.clone())),
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
                Some(KeySource::Literal(s.clone()))
            }
            Value::Placeholder(p) => param_index(p).map(KeySource::Param),
            Value::Null => Some(KeySource::Null),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match strip_cast(expr) {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(KeySource::Literal(format!("-{n}"))),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

fn param_index(p: &str) -> Option<usize> {
    p.strip_prefix('$')?.parse().ok().filter(|&n| n > 0)
}

#[cfg(test)]
mod tests;
