//! Metric queries evaluated at each step of a range: range aggregations over the samples a
//! [`Source`] gives, vector aggregations, and binary operations, with Prometheus' semantics
//! (windows `(t - range - offset, t - offset]`, one-to-one vector matching).

use std::collections::{BTreeMap, HashMap};

use super::pipeline::{ERROR_DETAILS_LABEL, ERROR_LABEL, Labels};
use super::syntax::{
    BinOp, Grouping, LogRange, MatchOp, MetricExpr, RangeOp, VectorMatching, VectorOp,
};

/// The most points one series may have, as Loki bounds a range query.
pub const MAX_POINTS: i64 = 11_000;
/// The most points (series × steps) one range aggregation may hold.
pub const MAX_TOTAL_POINTS: usize = 20_000_000;

/// The instants a query is evaluated at: `start`, `start + step`, … up to `end`.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    pub start: i64,
    pub end: i64,
    pub step: i64,
}

impl Steps {
    pub fn count(&self) -> usize {
        ((self.end - self.start) / self.step + 1).max(0) as usize
    }

    pub fn at(&self, k: usize) -> i64 {
        self.start + k as i64 * self.step
    }
}

/// A log query's samples, grouped by their labels: (timestamp, value) sorted by time. A value
/// is 1 per line for counting, the line's bytes, or the unwrapped number; a source may give
/// one sample standing for many lines (a count per bucket) where the windows cannot split it.
#[derive(Debug, Default)]
pub struct Series {
    pub labels: Labels,
    pub samples: Vec<(i64, f64)>,
}

/// Where samples come from.
pub trait Source {
    /// The samples of `range`'s log query in `[from, to]` (nanoseconds). With `group`, the
    /// caller sums the result by those labels, so the source may answer with series already
    /// reduced to them.
    fn samples(
        &mut self,
        range: &LogRange,
        op: RangeOp,
        from: i64,
        to: i64,
        steps: &Steps,
        group: Option<&Grouping>,
    ) -> Result<Vec<Series>, EvalError>;
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The query cannot be answered as asked (a 400).
    #[error("{0}")]
    Invalid(String),
    /// Reading the store failed (a 500).
    #[error("{0}")]
    Store(String),
}

/// A value per step for each series; `None` where a series has no point.
pub type Matrix = BTreeMap<Labels, Vec<Option<f64>>>;

/// What an expression evaluates to.
#[derive(Debug)]
pub enum Value {
    Scalar(Vec<f64>),
    Vector(Matrix),
}

/// Evaluates `expr` at every step.
pub fn evaluate(
    expr: &MetricExpr,
    steps: &Steps,
    source: &mut dyn Source,
) -> Result<Value, EvalError> {
    let value = eval(expr, steps, source, None)?;
    if let Value::Vector(matrix) = &value
        && let Some(labels) = matrix.keys().find(|l| l.contains_key(ERROR_LABEL))
    {
        return Err(EvalError::Invalid(format!(
            "pipeline error: '{}' for series: '{}'. Use a label filter to intentionally skip this error. (e.g | __error__!=\"{}\").{}",
            labels[ERROR_LABEL],
            show_labels(labels),
            labels[ERROR_LABEL],
            labels
                .get(ERROR_DETAILS_LABEL)
                .map(|d| format!(" Details: {d}"))
                .unwrap_or_default()
        )));
    }
    Ok(value)
}

fn show_labels(labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

fn eval(
    expr: &MetricExpr,
    steps: &Steps,
    source: &mut dyn Source,
    sum_hint: Option<&Grouping>,
) -> Result<Value, EvalError> {
    match expr {
        MetricExpr::Scalar(n) => Ok(Value::Scalar(vec![*n; steps.count()])),
        MetricExpr::VectorOf(n) => {
            let mut matrix = Matrix::new();
            matrix.insert(Labels::new(), vec![Some(*n); steps.count()]);
            Ok(Value::Vector(matrix))
        }
        MetricExpr::Range {
            op,
            parameter,
            range,
            grouping,
        } => range_aggregation(
            *op,
            *parameter,
            range,
            grouping.as_ref(),
            steps,
            source,
            sum_hint,
        ),
        MetricExpr::Vector {
            op,
            parameter,
            grouping,
            inner,
        } => {
            // A sum of counts may be counted by the groups directly.
            let hint = (*op == VectorOp::Sum)
                .then_some(grouping.as_ref())
                .flatten();
            let hint = hint.or(if *op == VectorOp::Sum && grouping.is_none() {
                Some(&NO_LABELS)
            } else {
                None
            });
            let inner = match eval(inner, steps, source, hint)? {
                Value::Vector(m) => m,
                Value::Scalar(_) => {
                    return Err(EvalError::Invalid(
                        "an aggregation needs a vector, not a number".into(),
                    ));
                }
            };
            Ok(Value::Vector(vector_aggregation(
                *op,
                *parameter,
                grouping.as_ref(),
                inner,
                steps.count(),
            )))
        }
        MetricExpr::Binary {
            op,
            return_bool,
            matching,
            lhs,
            rhs,
        } => {
            let lhs = eval(lhs, steps, source, None)?;
            let rhs = eval(rhs, steps, source, None)?;
            binary(
                *op,
                *return_bool,
                matching.as_ref(),
                lhs,
                rhs,
                steps.count(),
            )
        }
    }
}

static NO_LABELS: Grouping = Grouping {
    without: false,
    labels: Vec::new(),
};

fn range_aggregation(
    op: RangeOp,
    parameter: Option<f64>,
    range: &LogRange,
    grouping: Option<&Grouping>,
    steps: &Steps,
    source: &mut dyn Source,
    sum_hint: Option<&Grouping>,
) -> Result<Value, EvalError> {
    let from = steps.start - range.offset - range.range + 1;
    let to = steps.end - range.offset;
    let hint = match op {
        RangeOp::CountOverTime | RangeOp::Rate if range.unwrap.is_none() => sum_hint,
        _ => None,
    };
    let mut series = source.samples(range, op, from, to, steps, hint)?;
    if op == RangeOp::AbsentOverTime {
        return Ok(Value::Vector(absent(range, &series, steps)));
    }
    if let Some(grouping) = grouping {
        let mut merged: BTreeMap<Labels, Vec<(i64, f64)>> = BTreeMap::new();
        for s in series {
            merged
                .entry(grouped(&s.labels, grouping))
                .or_default()
                .extend(s.samples);
        }
        series = merged
            .into_iter()
            .map(|(labels, mut samples)| {
                samples.sort_by_key(|(ts, _)| *ts);
                Series { labels, samples }
            })
            .collect();
    }
    if series.len().saturating_mul(steps.count()) > MAX_TOTAL_POINTS {
        return Err(EvalError::Invalid(format!(
            "the query would make {} series of {} points, more than {MAX_TOTAL_POINTS} points; aggregate with sum by (…), a larger step or a shorter range",
            series.len(),
            steps.count()
        )));
    }
    let seconds = range.range as f64 / 1e9;
    let mut matrix = Matrix::new();
    for s in series {
        let mut values = vec![None; steps.count()];
        let (mut lo, mut hi) = (0, 0);
        for (k, slot) in values.iter_mut().enumerate() {
            let t = steps.at(k) - range.offset;
            while hi < s.samples.len() && s.samples[hi].0 <= t {
                hi += 1;
            }
            while lo < hi && s.samples[lo].0 <= t - range.range {
                lo += 1;
            }
            let window = &s.samples[lo..hi];
            if window.is_empty() {
                continue;
            }
            *slot = window_value(op, parameter, window, seconds);
        }
        if values.iter().any(Option::is_some) {
            let entry = matrix
                .entry(s.labels)
                .or_insert_with(|| vec![None; steps.count()]);
            for (slot, v) in entry.iter_mut().zip(values) {
                if let Some(v) = v {
                    *slot = Some(slot.unwrap_or(0.0) + v);
                }
            }
        }
    }
    Ok(Value::Vector(matrix))
}

fn window_value(
    op: RangeOp,
    parameter: Option<f64>,
    window: &[(i64, f64)],
    seconds: f64,
) -> Option<f64> {
    let values = window.iter().map(|(_, v)| *v);
    let sum: f64 = values.clone().sum();
    let n = window.len() as f64;
    Some(match op {
        RangeOp::CountOverTime | RangeOp::BytesOverTime | RangeOp::SumOverTime => sum,
        RangeOp::Rate | RangeOp::BytesRate => sum / seconds,
        RangeOp::AbsentOverTime => return None,
        RangeOp::AvgOverTime => sum / n,
        RangeOp::MinOverTime => values.fold(f64::INFINITY, f64::min),
        RangeOp::MaxOverTime => values.fold(f64::NEG_INFINITY, f64::max),
        RangeOp::FirstOverTime => window[0].1,
        RangeOp::LastOverTime => window[window.len() - 1].1,
        RangeOp::StdvarOverTime => variance(values),
        RangeOp::StddevOverTime => variance(values).sqrt(),
        RangeOp::QuantileOverTime => {
            let mut sorted: Vec<f64> = values.collect();
            sorted.sort_by(f64::total_cmp);
            quantile(parameter.unwrap_or(0.5), &sorted)
        }
    })
}

/// Population variance, as Prometheus computes it.
fn variance(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let n = values.clone().count() as f64;
    let mean = values.clone().sum::<f64>() / n;
    values.map(|v| (v - mean).powi(2)).sum::<f64>() / n
}

/// Prometheus' quantile: linear interpolation between the closest ranks.
fn quantile(q: f64, sorted: &[f64]) -> f64 {
    if sorted.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let lower = rank.floor() as usize;
    let upper = (lower + 1).min(sorted.len() - 1);
    let weight = rank - rank.floor();
    sorted[lower] * (1.0 - weight) + sorted[upper] * weight
}

fn absent(range: &LogRange, series: &[Series], steps: &Steps) -> Matrix {
    let labels: Labels = range
        .log
        .selector
        .iter()
        .filter(|m| m.op == MatchOp::Eq)
        .map(|m| (m.name.clone(), m.value.clone()))
        .collect();
    let mut values = vec![None; steps.count()];
    for (k, slot) in values.iter_mut().enumerate() {
        let t = steps.at(k) - range.offset;
        let present = series.iter().any(|s| {
            s.samples
                .iter()
                .any(|(ts, _)| *ts <= t && *ts > t - range.range)
        });
        if !present {
            *slot = Some(1.0);
        }
    }
    let mut matrix = Matrix::new();
    if values.iter().any(Option::is_some) {
        matrix.insert(labels, values);
    }
    matrix
}

/// The labels a grouping keeps of `labels`.
pub fn grouped(labels: &Labels, grouping: &Grouping) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| grouping.labels.iter().any(|g| g == *k) != grouping.without)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn vector_aggregation(
    op: VectorOp,
    parameter: Option<f64>,
    grouping: Option<&Grouping>,
    inner: Matrix,
    count: usize,
) -> Matrix {
    let key = |labels: &Labels| match grouping {
        Some(g) => grouped(labels, g),
        None => Labels::new(),
    };
    match op {
        VectorOp::Topk | VectorOp::Bottomk => {
            let k = parameter.unwrap_or(1.0) as usize;
            let mut out: Matrix = inner
                .keys()
                .map(|l| (l.clone(), vec![None; count]))
                .collect();
            let groups: Vec<Labels> = inner.keys().map(key).collect();
            for step in 0..count {
                let mut by_group: HashMap<&Labels, Vec<(&Labels, f64)>> = HashMap::new();
                for ((labels, values), group) in inner.iter().zip(&groups) {
                    if let Some(v) = values[step] {
                        by_group.entry(group).or_default().push((labels, v));
                    }
                }
                for (_, mut members) in by_group {
                    members.sort_by(|a, b| {
                        let order = a.1.total_cmp(&b.1);
                        let order = if op == VectorOp::Topk {
                            order.reverse()
                        } else {
                            order
                        };
                        order.then_with(|| a.0.cmp(b.0))
                    });
                    for (labels, v) in members.into_iter().take(k) {
                        if let Some(slot) = out.get_mut(labels) {
                            slot[step] = Some(v);
                        }
                    }
                }
            }
            out.retain(|_, values| values.iter().any(Option::is_some));
            out
        }
        VectorOp::Sort | VectorOp::SortDesc => inner,
        _ => {
            // Per group and step: count, sum, sum of squares, min, max.
            let mut acc: BTreeMap<Labels, Vec<[f64; 5]>> = BTreeMap::new();
            for (labels, values) in &inner {
                let slots = acc.entry(key(labels)).or_insert_with(|| {
                    vec![[0.0, 0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY]; count]
                });
                for (slot, v) in slots.iter_mut().zip(values) {
                    if let Some(v) = v {
                        slot[0] += 1.0;
                        slot[1] += v;
                        slot[2] += v * v;
                        slot[3] = slot[3].min(*v);
                        slot[4] = slot[4].max(*v);
                    }
                }
            }
            acc.into_iter()
                .map(|(labels, slots)| {
                    let values = slots
                        .into_iter()
                        .map(|[n, sum, squares, min, max]| {
                            (n > 0.0).then(|| match op {
                                VectorOp::Sum => sum,
                                VectorOp::Avg => sum / n,
                                VectorOp::Min => min,
                                VectorOp::Max => max,
                                VectorOp::Count => n,
                                VectorOp::Stdvar => (squares / n - (sum / n).powi(2)).max(0.0),
                                VectorOp::Stddev => {
                                    (squares / n - (sum / n).powi(2)).max(0.0).sqrt()
                                }
                                _ => sum,
                            })
                        })
                        .collect();
                    (labels, values)
                })
                .collect()
        }
    }
}

fn arithmetic(op: BinOp, a: f64, b: f64) -> Option<f64> {
    Some(match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => a / b,
        BinOp::Mod => a % b,
        BinOp::Pow => a.powf(b),
        BinOp::Eq => f64::from(u8::from(a == b)),
        BinOp::Ne => f64::from(u8::from(a != b)),
        BinOp::Gt => f64::from(u8::from(a > b)),
        BinOp::Ge => f64::from(u8::from(a >= b)),
        BinOp::Lt => f64::from(u8::from(a < b)),
        BinOp::Le => f64::from(u8::from(a <= b)),
        BinOp::And | BinOp::Or | BinOp::Unless => return None,
    })
}

/// A sample's value after `op` with the other side's: `None` drops it (a false comparison).
fn combine(op: BinOp, return_bool: bool, sample: f64, a: f64, b: f64) -> Option<f64> {
    let result = arithmetic(op, a, b)?;
    if op.is_comparison() && !return_bool {
        return (result == 1.0).then_some(sample);
    }
    Some(result)
}

fn binary(
    op: BinOp,
    return_bool: bool,
    matching: Option<&VectorMatching>,
    lhs: Value,
    rhs: Value,
    count: usize,
) -> Result<Value, EvalError> {
    match (lhs, rhs) {
        (Value::Scalar(a), Value::Scalar(b)) => {
            if op.is_set() {
                return Err(EvalError::Invalid(format!(
                    "{op:?} is only allowed between vectors"
                )));
            }
            if op.is_comparison() && !return_bool {
                return Err(EvalError::Invalid(
                    "comparisons between numbers must use bool".into(),
                ));
            }
            Ok(Value::Scalar(
                a.iter()
                    .zip(&b)
                    .map(|(x, y)| arithmetic(op, *x, *y).unwrap_or(f64::NAN))
                    .collect(),
            ))
        }
        (Value::Vector(m), Value::Scalar(s)) | (Value::Scalar(s), Value::Vector(m))
            if op.is_set() =>
        {
            let _ = (m, s);
            Err(EvalError::Invalid(format!(
                "{} is only allowed between vectors",
                format!("{op:?}").to_lowercase()
            )))
        }
        (Value::Vector(m), Value::Scalar(s)) => {
            Ok(Value::Vector(with_scalar(op, return_bool, m, &s, false)))
        }
        (Value::Scalar(s), Value::Vector(m)) => {
            Ok(Value::Vector(with_scalar(op, return_bool, m, &s, true)))
        }
        (Value::Vector(a), Value::Vector(b)) => Ok(Value::Vector(vectors(
            op,
            return_bool,
            matching,
            a,
            b,
            count,
        ))),
    }
}

fn with_scalar(
    op: BinOp,
    return_bool: bool,
    matrix: Matrix,
    scalar: &[f64],
    scalar_left: bool,
) -> Matrix {
    let mut out = Matrix::new();
    for (labels, values) in matrix {
        let values: Vec<Option<f64>> = values
            .iter()
            .zip(scalar)
            .map(|(v, s)| {
                let v = (*v)?;
                let (a, b) = if scalar_left { (*s, v) } else { (v, *s) };
                combine(op, return_bool, v, a, b)
            })
            .collect();
        if values.iter().any(Option::is_some) {
            out.insert(labels, values);
        }
    }
    out
}

fn match_key(labels: &Labels, matching: Option<&VectorMatching>) -> Labels {
    match matching {
        Some(m) => labels
            .iter()
            .filter(|(k, _)| m.labels.iter().any(|l| l == *k) == m.on)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => labels.clone(),
    }
}

/// A series of the right-hand side: its labels and values.
type Member<'a> = (&'a Labels, &'a Vec<Option<f64>>);

fn vectors(
    op: BinOp,
    return_bool: bool,
    matching: Option<&VectorMatching>,
    lhs: Matrix,
    rhs: Matrix,
    count: usize,
) -> Matrix {
    let mut right: HashMap<Labels, Vec<Member<'_>>> = HashMap::new();
    for (labels, values) in &rhs {
        right
            .entry(match_key(labels, matching))
            .or_default()
            .push((labels, values));
    }
    let value_at = |key: &Labels, step: usize| -> Option<f64> {
        right
            .get(key)
            .and_then(|list| list.iter().find_map(|(_, v)| v[step]))
    };
    let mut out = Matrix::new();
    let mut add = |labels: Labels, step: usize, v: f64| {
        out.entry(labels).or_insert_with(|| vec![None; count])[step] = Some(v);
    };
    let mut left_keys: HashMap<Labels, Vec<bool>> = HashMap::new();
    for (labels, values) in &lhs {
        let key = match_key(labels, matching);
        let present = left_keys
            .entry(key.clone())
            .or_insert_with(|| vec![false; count]);
        for step in 0..count {
            let Some(a) = values[step] else { continue };
            present[step] = true;
            let b = value_at(&key, step);
            match op {
                BinOp::And => {
                    if b.is_some() {
                        add(labels.clone(), step, a);
                    }
                }
                BinOp::Unless => {
                    if b.is_none() {
                        add(labels.clone(), step, a);
                    }
                }
                BinOp::Or => add(labels.clone(), step, a),
                _ => {
                    let Some(b) = b else { continue };
                    let Some(v) = combine(op, return_bool, a, a, b) else {
                        continue;
                    };
                    let result_labels = if op.is_comparison() && !return_bool {
                        labels.clone()
                    } else {
                        match matching {
                            Some(m) if m.on => key.clone(),
                            Some(m) => {
                                let mut l = labels.clone();
                                l.retain(|k, _| !m.labels.contains(k));
                                l
                            }
                            None => labels.clone(),
                        }
                    };
                    add(result_labels, step, v);
                }
            }
        }
    }
    if op == BinOp::Or {
        for (labels, values) in &rhs {
            let key = match_key(labels, matching);
            let taken = left_keys.get(&key);
            for (step, value) in values.iter().enumerate() {
                if let Some(v) = value
                    && !taken.is_some_and(|t| t[step])
                {
                    add(labels.clone(), step, *v);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(0.5, &sorted), 2.5);
        assert_eq!(quantile(0.0, &sorted), 1.0);
        assert_eq!(quantile(1.0, &sorted), 4.0);
        assert_eq!(quantile(2.0, &sorted), f64::INFINITY);
    }
}
