//! Rewrites a SELECT that must run on several shards into the statement each shard runs, and
//! the [`MergeSpec`] that turns their results into the client's answer:
//! - ORDER BY keys not in the select list become extra columns (stripped by the merge);
//! - LIMIT n OFFSET m becomes LIMIT n+m on the shards; the merge applies both;
//! - avg(x) becomes sum(x) plus an extra count(x); count(DISTINCT x) groups the shards by x;
//! - HAVING, and ORDER BY/LIMIT of an aggregating query, move from the shards to the merge.
//!
//! Anything it cannot rewrite into an exact answer is refused with the construct named.

use sqlparser::ast::{
    BinaryOperator, CastKind, DuplicateTreatment, Expr, Fetch, Function, FunctionArg,
    FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, LimitClause, ObjectName,
    ObjectNamePart, OrderByKind, OrderBySort, Query, SelectItem, SetExpr, Statement,
    TableWithJoins, UnaryOperator, Value, WindowType,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::analyze::{self, Schema};
use crate::merge::{Aggregate, CmpOp, Col, Count, MergeSpec, Output, Predicate, SortKey};

/// The shard statement and how to merge its results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub sql: String,
    pub spec: MergeSpec,
    /// Parameters the shard statement no longer uses (a LIMIT/OFFSET the merge applies): the
    /// statement must still declare them, as int8 when the client left their type open.
    pub dropped_params: Vec<usize>,
}

/// Rewrites one SELECT for a scatter; the error names what cannot be merged exactly.
pub fn rewrite(sql: &str, schema: &Schema) -> Result<Rewritten, String> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| format!("a statement the router cannot parse ({e})"))?;
    let [Statement::Query(query)] = statements.as_mut_slice() else {
        return Err("a multi-statement query on several shards".into());
    };
    let spec = rewrite_query(query, schema)?;
    let sql = statements[0].to_string();
    let dropped_params = [spec.limit, spec.offset]
        .into_iter()
        .flatten()
        .filter_map(|c| match c {
            Count::Param(n) => Some(n),
            Count::Const(_) => None,
        })
        .filter(|n| !sql.contains(&format!("${n}")))
        .collect();
    Ok(Rewritten {
        sql,
        spec,
        dropped_params,
    })
}

/// The extra columns being appended to the shard's select list.
struct Extras {
    items: Vec<SelectItem>,
    outputs: Vec<Output>,
}

impl Extras {
    fn push(&mut self, expr: Expr, output: Output) -> Col {
        let n = self.items.len();
        self.items.push(SelectItem::ExprWithAlias {
            expr,
            alias: Ident::new(format!("tessera_extra_{n}")),
        });
        self.outputs.push(output);
        Col::Extra(n)
    }
}

fn rewrite_query(query: &mut Query, schema: &Schema) -> Result<MergeSpec, String> {
    let (limit, offset) = limits(query)?;
    if !query.locks.is_empty() && (limit.is_some() || offset.is_some()) {
        // Each shard would lock limit + offset rows, most of them never returned.
        return Err("FOR UPDATE/SHARE with LIMIT/OFFSET over several shards".into());
    }
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Err("a set operation (UNION/INTERSECT/EXCEPT) on sharded tables".into());
    };
    let select = select.as_mut();
    let mut distinct = false;
    match &select.distinct {
        None | Some(sqlparser::ast::Distinct::All) => {}
        Some(sqlparser::ast::Distinct::Distinct) => distinct = true,
        Some(_) => return Err("DISTINCT ON over several shards".into()),
    }
    let group_exprs: Vec<Expr> = match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs.clone(),
        _ => return Err("GROUP BY ALL, ROLLUP, CUBE or GROUPING SETS over several shards".into()),
    };
    if group_exprs
        .iter()
        .any(|e| matches!(e, Expr::Rollup(_) | Expr::Cube(_) | Expr::GroupingSets(_)))
    {
        return Err("ROLLUP, CUBE or GROUPING SETS over several shards".into());
    }
    for item in &select.projection {
        if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item
            && has_cross_shard_window(e, schema, &select.from)
        {
            return Err(
                "window functions over several shards (unless partitioned by the shard key)".into(),
            );
        }
    }
    let wildcard = select.projection.iter().any(|i| {
        matches!(
            i,
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        )
    });
    let order: Vec<sqlparser::ast::OrderByExpr> = match &query.order_by {
        None => Vec::new(),
        Some(ob) => match &ob.kind {
            OrderByKind::Expressions(list) => list.clone(),
            OrderByKind::All(_) => return Err("ORDER BY ALL over several shards".into()),
        },
    };
    if order
        .iter()
        .any(|o| has_cross_shard_window(&o.expr, schema, &select.from))
    {
        return Err(
            "window functions over several shards (unless partitioned by the shard key)".into(),
        );
    }
    let aggregating = !group_exprs.is_empty()
        || select.having.is_some()
        || order.iter().any(|o| has_aggregate(&o.expr))
        || select.projection.iter().any(|i| match i {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                has_aggregate(e)
            }
            _ => false,
        });
    // ORDER BY and GROUP BY name the client's select list, not the rewritten one.
    let original = select.projection.clone();
    let mut extras = Extras {
        items: Vec::new(),
        outputs: Vec::new(),
    };
    let mut spec = MergeSpec {
        limit,
        offset,
        distinct,
        ..MergeSpec::default()
    };

    if aggregating {
        if wildcard {
            return Err("SELECT * with aggregates over several shards".into());
        }
        if distinct {
            return Err("SELECT DISTINCT with aggregates over several shards".into());
        }
        let mut outputs = Vec::with_capacity(select.projection.len());
        let mut distinct_arg: Option<Expr> = None;
        let mut key_distinct = false;
        let from = select.from.clone();
        for item in select.projection.iter_mut() {
            let (expr, alias) = match item {
                SelectItem::UnnamedExpr(e) => (e.clone(), None),
                SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.clone())),
                _ => unreachable!("wildcards refused above"),
            };
            let Some(call) = aggregate_call(&expr)? else {
                if has_aggregate(&expr) {
                    return Err(format!(
                        "an expression over an aggregate ({expr}) over several shards"
                    ));
                }
                outputs.push(Output::Key);
                continue;
            };
            let name = alias.unwrap_or_else(|| Ident::new(call.name.clone()));
            match call.kind {
                AggKind::Plain(output) => outputs.push(output),
                AggKind::Avg => {
                    let count = extras.push(renamed(&call.function, "count"), Output::Count);
                    *item = SelectItem::ExprWithAlias {
                        expr: renamed(&call.function, "sum"),
                        alias: name,
                    };
                    outputs.push(Output::Avg { count });
                }
                AggKind::CountDistinct(arg) => {
                    if analyze::is_shard_key(&arg, schema, &from) {
                        // Each key lives on one shard: the shards' distinct counts add up.
                        key_distinct = true;
                        outputs.push(Output::Count);
                        continue;
                    }
                    match &distinct_arg {
                        Some(prev) if *prev != *arg => {
                            return Err(
                                "count(DISTINCT) of two different expressions over several shards"
                                    .into(),
                            );
                        }
                        _ => distinct_arg = Some((*arg).clone()),
                    }
                    *item = SelectItem::ExprWithAlias {
                        expr: *arg,
                        alias: name,
                    };
                    outputs.push(Output::CountDistinct);
                }
            }
        }
        // GROUP BY keys: output columns, or extras carrying them.
        let mut keys = Vec::with_capacity(group_exprs.len());
        for e in &group_exprs {
            if let Some(hidden) = aliased(e, &original)
                && hidden != *e
                && mentions(&hidden, e)
            {
                // Postgres groups by the input column of that name, not by the output the
                // alias names: the proxy could not tell the shards' groups apart.
                return Err(format!(
                    "GROUP BY {e}, an output alias that hides a column of the same name, over several shards"
                ));
            }
            let col = match resolve_output(e, &original)? {
                Some(col) => col,
                None => extras.push(e.clone(), Output::Key),
            };
            keys.push(col);
        }
        if distinct_arg.is_some() && key_distinct {
            // The shards group by the other count(DISTINCT) argument, which would split the
            // key's distinct counts across those groups.
            return Err("count(DISTINCT) of two different expressions over several shards".into());
        }
        if let Some(arg) = &distinct_arg {
            if let GroupByExpr::Expressions(exprs, _) = &mut select.group_by {
                exprs.push(arg.clone());
            }
            // A COUNT(DISTINCT) inside another aggregate's group would double count.
            if outputs
                .iter()
                .zip(&select.projection)
                .any(|(o, _)| matches!(o, Output::Key))
                && group_exprs.is_empty()
            {
                return Err(
                    "a non-aggregate column next to count(DISTINCT) without GROUP BY".into(),
                );
            }
        }
        let having = match select.having.take() {
            Some(h) => Some(predicate(&h, &mut extras, distinct_arg.as_ref())?),
            None => None,
        };
        for o in &order {
            let col = match resolve_output(&o.expr, &original)? {
                Some(col) => col,
                None => match aggregate_call(&o.expr)? {
                    Some(call) => push_aggregate(&mut extras, call, distinct_arg.as_ref())?,
                    None => match group_exprs.iter().position(|g| *g == o.expr) {
                        Some(k) => keys[k],
                        None => {
                            return Err(format!(
                                "ORDER BY {} in an aggregating query over several shards",
                                o.expr
                            ));
                        }
                    },
                },
            };
            spec.order.push(sort_key(col, o)?);
        }
        let visible = select.projection.len();
        let mut all = outputs;
        all.extend(extras.outputs.iter().copied());
        spec.aggregate = Some(Aggregate {
            outputs: all,
            keys,
            having,
        });
        spec.extras = extras.items.len();
        spec.columns = Some(visible + spec.extras);
        select.projection.extend(extras.items);
        // Groups span shards: ordering and limits apply after the merge.
        query.order_by = None;
        query.limit_clause = None;
        query.fetch = None;
        return Ok(spec);
    }

    for o in &order {
        let col = match resolve_output(&o.expr, &select.projection)? {
            Some(col) => col,
            None if distinct => {
                return Err(format!(
                    "ORDER BY {} not in the select list of SELECT DISTINCT",
                    o.expr
                ));
            }
            // An alias of an item after `*` (its position is unknown): its expression.
            None => extras.push(
                aliased(&o.expr, &select.projection).unwrap_or_else(|| o.expr.clone()),
                Output::Key,
            ),
        };
        spec.order.push(sort_key(col, o)?);
    }
    spec.extras = extras.items.len();
    if !wildcard {
        spec.columns = Some(select.projection.len() + spec.extras);
    }
    select.projection.extend(extras.items);
    // Each shard returns at most limit + offset rows; the merge skips and cuts.
    query.fetch = None;
    query.limit_clause = match (limit, offset) {
        (None, _) => None,
        (Some(l), None) => Some(limit_clause(count_expr(l))),
        (Some(Count::Const(l)), Some(Count::Const(o))) => {
            Some(limit_clause(count_expr(Count::Const(l.saturating_add(o)))))
        }
        (Some(l), Some(o)) => Some(limit_clause(Expr::Nested(Box::new(Expr::BinaryOp {
            left: Box::new(count_expr(l)),
            op: BinaryOperator::Plus,
            right: Box::new(count_expr(o)),
        })))),
    };
    Ok(spec)
}

fn limit_clause(limit: Expr) -> LimitClause {
    LimitClause::LimitOffset {
        limit: Some(limit),
        offset: None,
        limit_by: Vec::new(),
    }
}

fn count_expr(c: Count) -> Expr {
    match c {
        Count::Const(n) => Expr::value(Value::Number(n.to_string(), false)),
        Count::Param(n) => Expr::Cast {
            kind: CastKind::DoubleColon,
            expr: Box::new(Expr::value(Value::Placeholder(format!("${n}")))),
            data_type: sqlparser::ast::DataType::BigInt(None),
            format: None,
        },
    }
}

/// LIMIT and OFFSET (or FETCH FIRST) as constants or parameters.
fn limits(query: &Query) -> Result<(Option<Count>, Option<Count>), String> {
    let (mut limit, mut offset) = (None, None);
    match &query.limit_clause {
        None => {}
        Some(LimitClause::LimitOffset {
            limit: l,
            offset: o,
            limit_by,
        }) => {
            if !limit_by.is_empty() {
                return Err("LIMIT BY".into());
            }
            limit = match l {
                None => None,
                Some(Expr::Value(v)) if matches!(v.value, Value::Null) => None,
                Some(e) => Some(count(e)?),
            };
            offset = o.as_ref().map(|o| count(&o.value)).transpose()?;
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => {
            return Err("LIMIT offset, count".into());
        }
    }
    if let Some(Fetch {
        with_ties,
        percent,
        quantity,
    }) = &query.fetch
    {
        if *with_ties || *percent {
            return Err("FETCH ... WITH TIES or PERCENT over several shards".into());
        }
        limit = Some(match quantity {
            Some(q) => count(q)?,
            None => Count::Const(1),
        });
    }
    Ok((limit, offset))
}

fn count(e: &Expr) -> Result<Count, String> {
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n
                .parse::<u64>()
                .map(Count::Const)
                .map_err(|_| format!("LIMIT/OFFSET {n} over several shards")),
            Value::Placeholder(p) => p
                .strip_prefix('$')
                .and_then(|n| n.parse().ok())
                .map(Count::Param)
                .ok_or_else(|| format!("LIMIT/OFFSET {p} over several shards")),
            _ => Err(format!("LIMIT/OFFSET {e} over several shards")),
        },
        _ => Err(format!("LIMIT/OFFSET expression {e} over several shards")),
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        Expr::Cast { expr, .. } => strip(expr),
        other => other,
    }
}

/// A `COLLATE` other than "C"/"POSIX": an order the proxy's bytewise comparison cannot follow.
fn foreign_collation(e: &Expr) -> Option<String> {
    let mut found = None;
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if let Expr::Collate { collation, .. } = x {
            let name = collation.to_string();
            let bare = name.trim_matches('"');
            if !["C", "POSIX", "ucs_basic"].contains(&bare) {
                found = Some(name);
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

fn sort_key(col: Col, o: &sqlparser::ast::OrderByExpr) -> Result<SortKey, String> {
    if let Some(collation) = foreign_collation(&o.expr) {
        return Err(format!(
            "ORDER BY ... COLLATE {collation} over several shards (only \"C\" ordering is merged)"
        ));
    }
    let desc = match &o.options.sort {
        None | Some(OrderBySort::Asc) => false,
        Some(OrderBySort::Desc) => true,
        Some(OrderBySort::Using(_)) => return Err("ORDER BY ... USING over several shards".into()),
    };
    if o.with_fill.is_some() {
        return Err("ORDER BY ... WITH FILL".into());
    }
    Ok(SortKey {
        col,
        desc,
        // Postgres: NULLs sort as larger than every value unless told otherwise.
        nulls_first: o.options.nulls_first.unwrap_or(desc),
    })
}

/// The output column an ORDER BY / GROUP BY expression names: a position, an output name, or
/// an expression written exactly as in the select list.
fn resolve_output(e: &Expr, projection: &[SelectItem]) -> Result<Option<Col>, String> {
    if let Expr::Value(v) = e
        && let Value::Number(n, _) = &v.value
    {
        let k: usize = n
            .parse()
            .map_err(|_| format!("position {n} is not in the select list"))?;
        if k == 0 || k > projection.len() {
            return Err(format!("position {n} is not in the select list"));
        }
        if matches!(
            projection[k - 1],
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
        ) || projection[..k].iter().any(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        }) {
            return Err("a position in ORDER BY/GROUP BY after * over several shards".into());
        }
        return Ok(Some(Col::Visible(k - 1)));
    }
    // Items after a `*` have no known position.
    let before_wildcard = projection
        .iter()
        .position(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        })
        .unwrap_or(projection.len());
    if let Expr::Identifier(name) = e {
        let wanted = fold(name);
        for (j, item) in projection[..before_wildcard].iter().enumerate() {
            if let SelectItem::ExprWithAlias { alias, .. } = item
                && fold(alias) == wanted
            {
                return Ok(Some(Col::Visible(j)));
            }
        }
    }
    for (j, item) in projection[..before_wildcard].iter().enumerate() {
        if let SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. } = item
            && x == e
        {
            return Ok(Some(Col::Visible(j)));
        }
    }
    Ok(None)
}

/// `e` mentions the column `name` (an identifier, possibly qualified).
fn mentions(e: &Expr, name: &Expr) -> bool {
    let Expr::Identifier(wanted) = name else {
        return false;
    };
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        let hit = match x {
            Expr::Identifier(i) => fold(i) == fold(wanted),
            Expr::CompoundIdentifier(parts) => {
                parts.last().is_some_and(|i| fold(i) == fold(wanted))
            }
            _ => false,
        };
        if hit {
            found = true;
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

/// The expression an output alias stands for.
fn aliased(e: &Expr, projection: &[SelectItem]) -> Option<Expr> {
    let Expr::Identifier(name) = e else {
        return None;
    };
    projection.iter().find_map(|item| match item {
        SelectItem::ExprWithAlias { expr, alias } if fold(alias) == fold(name) => {
            Some(expr.clone())
        }
        _ => None,
    })
}

fn fold(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

enum AggKind {
    Plain(Output),
    Avg,
    CountDistinct(Box<Expr>),
}

struct Call {
    name: String,
    function: Function,
    kind: AggKind,
}

fn function_name(name: &ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(i)) => i.value.to_ascii_lowercase(),
        _ => String::new(),
    }
}

/// `expr` itself is a call of an aggregate the merge can combine; errors for aggregates it
/// cannot.
fn aggregate_call(expr: &Expr) -> Result<Option<Call>, String> {
    let Expr::Function(f) = expr else {
        return Ok(None);
    };
    let name = function_name(&f.name);
    if !analyze::AGGREGATES.contains(&name.as_str()) || f.over.is_some() {
        return Ok(None);
    }
    if !f.within_group.is_empty() {
        return Err(format!("{name}() WITHIN GROUP over several shards"));
    }
    let FunctionArguments::List(list) = &f.args else {
        return Err(format!("aggregate {name}() over several shards"));
    };
    if !list.clauses.is_empty() {
        return Err(format!(
            "{name}() with ORDER BY or other clauses over several shards"
        ));
    }
    let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
    let kind = match name.as_str() {
        "count" if distinct => {
            let [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] = list.args.as_slice() else {
                return Err("count(DISTINCT) of several expressions over several shards".into());
            };
            if f.filter.is_some() {
                return Err("count(DISTINCT ...) FILTER over several shards".into());
            }
            AggKind::CountDistinct(Box::new(arg.clone()))
        }
        "count" => AggKind::Plain(Output::Count),
        "min" | "max" if foreign_collation(expr).is_some() => {
            return Err(format!(
                "{name}() with a COLLATE other than \"C\" over several shards"
            ));
        }
        "min" => AggKind::Plain(Output::Min),
        "max" => AggKind::Plain(Output::Max),
        "sum" if !distinct => AggKind::Plain(Output::Sum),
        "avg" if !distinct => AggKind::Avg,
        "bool_and" | "every" => AggKind::Plain(Output::BoolAnd),
        "bool_or" => AggKind::Plain(Output::BoolOr),
        _ if distinct => return Err(format!("{name}(DISTINCT ...) over several shards")),
        _ => return Err(format!("aggregate {name}() over several shards")),
    };
    Ok(Some(Call {
        name,
        function: f.clone(),
        kind,
    }))
}

/// The same call under another aggregate's name (avg -> sum and count).
fn renamed(f: &Function, name: &str) -> Expr {
    let mut f = f.clone();
    f.name = ObjectName::from(vec![Ident::new(name)]);
    Expr::Function(f)
}

/// Appends an aggregate the merge needs but the client did not select (HAVING, ORDER BY).
fn push_aggregate(
    extras: &mut Extras,
    call: Call,
    distinct_arg: Option<&Expr>,
) -> Result<Col, String> {
    Ok(match call.kind {
        AggKind::Plain(o) => extras.push(Expr::Function(call.function), o),
        AggKind::Avg => {
            let count = extras.push(renamed(&call.function, "count"), Output::Count);
            extras.push(renamed(&call.function, "sum"), Output::Avg { count })
        }
        AggKind::CountDistinct(arg) => {
            if distinct_arg != Some(&*arg) {
                return Err(format!(
                    "count(DISTINCT {arg}) in HAVING or ORDER BY over several shards"
                ));
            }
            extras.push(*arg, Output::CountDistinct)
        }
    })
}

fn predicate(
    e: &Expr,
    extras: &mut Extras,
    distinct_arg: Option<&Expr>,
) -> Result<Predicate, String> {
    match e {
        Expr::Nested(inner) => predicate(inner, extras, distinct_arg),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Predicate::Not(Box::new(predicate(
            expr,
            extras,
            distinct_arg,
        )?))),
        Expr::BinaryOp { left, op, right } => {
            let logic = match op {
                BinaryOperator::And => Some(true),
                BinaryOperator::Or => Some(false),
                _ => None,
            };
            if let Some(and) = logic {
                let (a, b) = (
                    Box::new(predicate(left, extras, distinct_arg)?),
                    Box::new(predicate(right, extras, distinct_arg)?),
                );
                return Ok(if and {
                    Predicate::And(a, b)
                } else {
                    Predicate::Or(a, b)
                });
            }
            let op = match op {
                BinaryOperator::Eq => CmpOp::Eq,
                BinaryOperator::NotEq => CmpOp::NotEq,
                BinaryOperator::Lt => CmpOp::Lt,
                BinaryOperator::LtEq => CmpOp::LtEq,
                BinaryOperator::Gt => CmpOp::Gt,
                BinaryOperator::GtEq => CmpOp::GtEq,
                _ => return Err(format!("HAVING {e} over several shards")),
            };
            let flip = |op| match op {
                CmpOp::Lt => CmpOp::Gt,
                CmpOp::LtEq => CmpOp::GtEq,
                CmpOp::Gt => CmpOp::Lt,
                CmpOp::GtEq => CmpOp::LtEq,
                other => other,
            };
            let (agg, lit, op) = match (aggregate_call(left)?, literal(right)) {
                (Some(call), Some(lit)) => (call, lit, op),
                _ => match (aggregate_call(right)?, literal(left)) {
                    (Some(call), Some(lit)) => (call, lit, flip(op)),
                    _ => {
                        return Err(format!(
                            "HAVING {e} over several shards (only an aggregate compared with a constant is merged)"
                        ));
                    }
                },
            };
            let col = push_aggregate(extras, agg, distinct_arg)?;
            Ok(Predicate::Cmp {
                col,
                op,
                literal: lit,
            })
        }
        _ => Err(format!("HAVING {e} over several shards")),
    }
}

/// A constant's text, as the type's input function would read it.
fn literal(e: &Expr) -> Option<String> {
    match strip(e) {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.clone()),
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match strip(expr) {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(format!("-{n}")),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

fn has_aggregate(e: &Expr) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if let Expr::Function(f) = x
            && f.over.is_none()
            && analyze::AGGREGATES.contains(&function_name(&f.name).as_str())
        {
            found = true;
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

/// A window function whose partitions may span shards: any window not partitioned by the
/// shard key (a partition by the key lives on one shard, so each shard's answer is exact).
fn has_cross_shard_window(e: &Expr, schema: &Schema, from: &[TableWithJoins]) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if let Expr::Function(f) = x
            && let Some(over) = &f.over
        {
            let on_key = match over {
                WindowType::WindowSpec(spec) => spec
                    .partition_by
                    .iter()
                    .any(|p| analyze::is_shard_key(p, schema, from)),
                WindowType::NamedWindow(_) => false,
            };
            if !on_key {
                found = true;
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

/// One shard's part of a multi-row INSERT whose rows belong to several shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitInsert {
    /// The INSERT with only this shard's rows, its parameters renumbered from `$1`.
    pub sql: String,
    /// For each parameter of `sql`, the client's parameter number (1-based) it takes.
    pub params: Vec<usize>,
}

/// Splits a multi-row INSERT by the shard of each row (`row_shards[r]` for VALUES row `r`).
pub fn split_insert(sql: &str, row_shards: &[usize]) -> Result<Vec<(usize, SplitInsert)>, String> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| format!("an INSERT the router cannot parse ({e})"))?;
    let [Statement::Insert(insert)] = statements.as_slice() else {
        return Err("a multi-statement INSERT over several shards".into());
    };
    let Some(SetExpr::Values(values)) = insert.source.as_ref().map(|q| q.body.as_ref()) else {
        return Err("INSERT ... SELECT over several shards".into());
    };
    if values.rows.len() != row_shards.len() {
        return Err("an INSERT whose rows the router counted differently".into());
    }
    if insert.on.is_some() && insert.returning.is_some() {
        // RETURNING rows come back in VALUES order, merged from the shards by that order;
        // rows skipped by ON CONFLICT would shift it.
        return Err("a multi-row INSERT ... ON CONFLICT ... RETURNING whose rows belong to different shards".into());
    }
    let mut shards: Vec<usize> = row_shards.to_vec();
    shards.sort_unstable();
    shards.dedup();
    let mut out = Vec::with_capacity(shards.len());
    for shard in shards {
        let mut stmt = statements[0].clone();
        if let Statement::Insert(insert) = &mut stmt
            && let Some(source) = insert.source.as_mut()
            && let SetExpr::Values(values) = source.body.as_mut()
        {
            let rows = std::mem::take(&mut values.rows);
            values.rows = rows
                .into_iter()
                .zip(row_shards)
                .filter(|(_, s)| **s == shard)
                .map(|(row, _)| row)
                .collect();
        }
        // Renumber the parameters left, in order of first use.
        let mut params: Vec<usize> = Vec::new();
        let _ = sqlparser::ast::visit_expressions_mut(&mut stmt, |e| {
            if let Expr::Value(v) = e
                && let Value::Placeholder(p) = &mut v.value
                && let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
            {
                let new = match params.iter().position(|&old| old == n) {
                    Some(k) => k + 1,
                    None => {
                        params.push(n);
                        params.len()
                    }
                };
                *p = format!("${new}");
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
        out.push((
            shard,
            SplitInsert {
                sql: stmt.to_string(),
                params,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        let mut s = Schema::default();
        s.sharded.insert("users".into(), "id".into());
        s.sharded.insert("orders".into(), "user_id".into());
        s
    }

    fn rw(sql: &str) -> Rewritten {
        rewrite(sql, &schema()).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    #[test]
    fn order_by_hidden_column_and_limit_offset() {
        let r = rw("SELECT name FROM users ORDER BY id DESC LIMIT 10 OFFSET 5");
        assert_eq!(
            r.sql,
            "SELECT name, id AS tessera_extra_0 FROM users ORDER BY id DESC LIMIT 15"
        );
        assert_eq!(r.spec.extras, 1);
        assert_eq!(
            r.spec.order,
            vec![SortKey {
                col: Col::Extra(0),
                desc: true,
                nulls_first: true
            }]
        );
        assert_eq!(r.spec.limit, Some(Count::Const(10)));
        assert_eq!(r.spec.offset, Some(Count::Const(5)));
    }

    #[test]
    fn order_by_alias_position_and_params() {
        let r = rw("SELECT id AS k, name FROM users ORDER BY k, 2 NULLS FIRST LIMIT $1 OFFSET $2");
        assert_eq!(r.spec.extras, 0);
        assert_eq!(r.spec.order[0].col, Col::Visible(0));
        assert_eq!(r.spec.order[1].col, Col::Visible(1));
        assert!(r.spec.order[1].nulls_first);
        assert!(
            r.sql.ends_with("LIMIT ($1::BIGINT + $2::BIGINT)"),
            "{}",
            r.sql
        );
    }

    #[test]
    fn avg_and_having_and_order_by_aggregate() {
        let r = rw(
            "SELECT status, avg(amount), count(*) FROM orders GROUP BY status HAVING sum(amount) > 100 ORDER BY count(*) DESC LIMIT 3",
        );
        assert_eq!(
            r.sql,
            "SELECT status, sum(amount) AS avg, count(*), count(amount) AS tessera_extra_0, sum(amount) AS tessera_extra_1 FROM orders GROUP BY status"
        );
        let agg = r.spec.aggregate.expect("aggregate");
        assert_eq!(agg.keys, vec![Col::Visible(0)]);
        assert_eq!(
            agg.outputs,
            vec![
                Output::Key,
                Output::Avg {
                    count: Col::Extra(0)
                },
                Output::Count,
                Output::Count,
                Output::Sum
            ]
        );
        assert_eq!(r.spec.order[0].col, Col::Visible(2));
    }

    #[test]
    fn count_distinct_groups_by_its_argument_unless_it_is_the_key() {
        let r = rw("SELECT count(DISTINCT status), count(*) FROM orders");
        assert_eq!(
            r.sql,
            "SELECT status AS count, count(*) FROM orders GROUP BY status"
        );
        let r = rw("SELECT count(DISTINCT user_id) FROM orders");
        assert_eq!(r.sql, "SELECT count(DISTINCT user_id) FROM orders");
        assert_eq!(r.spec.aggregate.expect("agg").outputs, vec![Output::Count]);
    }

    #[test]
    fn inserts_split_by_row_with_parameters_renumbered() {
        let parts = split_insert(
            "INSERT INTO users (id, name) VALUES ($1, $2), ($3, $4), ($5, 'x') RETURNING id",
            &[1, 0, 1],
        )
        .expect("split");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, 0);
        assert_eq!(
            parts[0].1.sql,
            "INSERT INTO users (id, name) VALUES ($1, $2) RETURNING id"
        );
        assert_eq!(parts[0].1.params, vec![3, 4]);
        assert_eq!(
            parts[1].1.sql,
            "INSERT INTO users (id, name) VALUES ($1, $2), ($3, 'x') RETURNING id"
        );
        assert_eq!(parts[1].1.params, vec![1, 2, 5]);
    }

    #[test]
    fn windows_partitioned_by_the_shard_key_run_per_shard() {
        let r = rw(
            "SELECT user_id, row_number() OVER (PARTITION BY user_id ORDER BY id) FROM orders ORDER BY user_id",
        );
        assert_eq!(r.spec.order[0].col, Col::Visible(0));
    }

    #[test]
    fn order_by_names_the_clients_columns_not_the_rewritten_ones() {
        let r = rw("SELECT g, avg(x), sum(x) FROM orders GROUP BY g ORDER BY sum(x)");
        assert_eq!(r.spec.order[0].col, Col::Visible(2));
        let r = rw("SELECT *, -id AS neg FROM users ORDER BY neg LIMIT 1");
        assert!(r.sql.contains("-id AS tessera_extra_0"), "{}", r.sql);
        assert_eq!(r.spec.order[0].col, Col::Extra(0));
        let r = rw("SELECT 'total' FROM orders ORDER BY count(*)");
        assert!(r.spec.aggregate.is_some());
        let r = rw("SELECT g, count(*) FROM orders GROUP BY g ORDER BY g LIMIT $1 OFFSET $2");
        assert_eq!(r.dropped_params, vec![1, 2]);
    }

    #[test]
    fn refusals_name_the_construct() {
        for (sql, needle) in [
            (
                "SELECT count(*) + 1 FROM users",
                "expression over an aggregate",
            ),
            ("SELECT string_agg(name, ',') FROM users", "string_agg"),
            ("SELECT DISTINCT ON (name) name FROM users", "DISTINCT ON"),
            ("SELECT row_number() OVER () FROM users", "window"),
            (
                "SELECT row_number() OVER (PARTITION BY name ORDER BY id) FROM users",
                "window",
            ),
            (
                "SELECT id FROM users ORDER BY rank() OVER (ORDER BY id) LIMIT 3",
                "window",
            ),
            ("SELECT id FROM users LIMIT 5 FOR UPDATE", "FOR UPDATE"),
            (
                "SELECT lower(name) AS name, count(*) FROM users GROUP BY name",
                "hides a column",
            ),
            (
                "SELECT name FROM users ORDER BY name COLLATE \"de-x-icu\" LIMIT 3",
                "COLLATE",
            ),
            (
                "SELECT status, count(DISTINCT note) FROM orders GROUP BY status ORDER BY note",
                "ORDER BY note",
            ),
            ("SELECT name FROM users ORDER BY name USING <", "USING"),
            (
                "SELECT DISTINCT name FROM users ORDER BY id",
                "not in the select list",
            ),
            (
                "SELECT name, count(*) FROM users GROUP BY name HAVING name > 'a'",
                "HAVING",
            ),
        ] {
            let e = rewrite(sql, &schema()).expect_err(sql);
            assert!(e.contains(needle), "{sql}: {e}");
        }
    }
}
