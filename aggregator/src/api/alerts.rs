//! `/api/alerts…`: alerts (open and history), acknowledging and resolving them, and the
//! rules (CRUD; changes are admin-only and recorded in the audit trail).

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use logging_common::Timestamp;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::params::Params;
use super::{Admin, Body, Reader, SharedState, Who, audit, json as json_reply};
use crate::alerts::manager::{Command, CommandError};
use crate::alerts::rules::{Rule, RuleSource, parse_spec};
use crate::alerts::{AlertRecord, Alerting};
use crate::auth::Caller;
use crate::db::{AlertFilter, is_unique_violation};
use crate::error::ApiError;

const CURSOR_VERSION: u8 = 1;
const STATUSES: [&str; 4] = ["pending", "firing", "acknowledged", "resolved"];
const SEVERITIES: [&str; 3] = ["info", "warning", "critical"];

fn db_error(error: crate::db::DbError) -> ApiError {
    ApiError::internal("the relational store failed", error)
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(text).map_err(|_| ApiError::field("id", format!("{text:?} is not a UUID")))
}

fn encode_cursor(created_ns: i64, id: &str) -> String {
    let mut bytes = vec![CURSOR_VERSION];
    bytes.extend_from_slice(&created_ns.to_be_bytes());
    bytes.extend_from_slice(id.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_cursor(text: &str) -> Result<(i64, String), ApiError> {
    let invalid = || ApiError::field("cursor", "not a cursor returned by this API");
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    if bytes.len() < 10 || bytes[0] != CURSOR_VERSION {
        return Err(invalid());
    }
    let mut ns = [0u8; 8];
    ns.copy_from_slice(&bytes[1..9]);
    let id = String::from_utf8(bytes[9..].to_vec()).map_err(|_| invalid())?;
    Uuid::try_parse(&id).map_err(|_| invalid())?;
    Ok((i64::from_be_bytes(ns), id))
}

/// `GET /api/alerts?status=&severity=&rule=&limit=&cursor=`: newest first.
pub async fn list(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut params = Params::parse(query.as_deref());
    let statuses = params.take_all("status");
    for status in &statuses {
        if !STATUSES.contains(&status.as_str()) && status != "active" {
            return Err(ApiError::field(
                "status",
                format!("{status:?}: one of pending, firing, acknowledged, resolved (or active)"),
            ));
        }
    }
    // `active` (the seed's word) means every alert that is not resolved.
    let statuses: Vec<String> = statuses
        .into_iter()
        .flat_map(|s| {
            if s == "active" {
                vec!["pending".into(), "firing".into(), "acknowledged".into()]
            } else {
                vec![s]
            }
        })
        .collect();
    let severity = params.take("severity");
    if let Some(s) = &severity
        && !SEVERITIES.contains(&s.as_str())
    {
        return Err(ApiError::field(
            "severity",
            format!("{s:?}: one of info, warning, critical"),
        ));
    }
    let mut filter = AlertFilter {
        statuses,
        severity,
        rule: params.take("rule"),
        after: None,
        limit: params.take_limit()?,
    };
    if let Some(cursor) = params.take("cursor") {
        filter.after = Some(decode_cursor(&cursor)?);
    }
    params.finish("")?;
    let page = state.db.list_alerts(&filter).await.map_err(db_error)?;
    let items: Vec<Value> = page
        .docs
        .iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    Ok(json_reply(
        StatusCode::OK,
        &json!({
            "items": items,
            "next_cursor": page.next.map(|(ns, id)| encode_cursor(ns, &id)),
        }),
    ))
}

/// `GET /api/alerts/{id}`: the alert and how each of its notifications went.
pub async fn get_one(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let Some(doc) = state.db.alert_doc(id).await.map_err(db_error)? else {
        return Err(ApiError::not_found(format!("no alert with id {id}")));
    };
    let mut alert: Value =
        serde_json::from_str(&doc).map_err(|e| ApiError::internal("an unreadable alert", e))?;
    let notifications: Vec<Value> = state
        .db
        .notifications_of(id)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|n| {
            json!({
                "id": n.id,
                "event": n.event,
                "channel": n.channel,
                "status": n.status,
                "attempts": n.attempts,
                "last_error": n.last_error,
                "created_at": Timestamp::from_nanos(n.created_at_ns),
                "sent_at": n.sent_at_ns.map(Timestamp::from_nanos),
                "next_attempt_at": (n.status == "pending").then(|| Timestamp::from_nanos(n.next_attempt_ns)),
            })
        })
        .collect();
    alert["notifications"] = Value::Array(notifications);
    Ok(json_reply(StatusCode::OK, &alert))
}

async fn command(
    state: &SharedState,
    make: impl FnOnce(oneshot::Sender<Result<AlertRecord, CommandError>>) -> Command,
) -> Result<AlertRecord, ApiError> {
    let (reply, answer) = oneshot::channel();
    state
        .alerts
        .commands
        .send(make(reply))
        .await
        .map_err(|_| ApiError::unavailable("the alert manager is stopping"))?;
    match answer.await {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(CommandError::NotFound(id))) => {
            Err(ApiError::not_found(format!("no alert with id {id}")))
        }
        Ok(Err(CommandError::Conflict(detail))) => Err(ApiError::new(StatusCode::CONFLICT, detail)),
        Ok(Err(CommandError::Db(error))) => Err(db_error(error)),
        Err(_) => Err(ApiError::unavailable("the alert manager is stopping")),
    }
}

/// What an operator does to an alert.
enum Operation {
    Acknowledge,
    Resolve,
}

async fn operate(
    state: SharedState,
    caller: Caller,
    headers: HeaderMap,
    peer: std::net::SocketAddr,
    id: &str,
    operation: Operation,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    let by = caller.token_id.clone();
    let (record, action) = match operation {
        Operation::Acknowledge => (
            command(&state, |reply| Command::Acknowledge { id, by, reply }).await?,
            "alert.acknowledged",
        ),
        Operation::Resolve => (
            command(&state, |reply| Command::Resolve { id, by, reply }).await?,
            "alert.resolved",
        ),
    };
    let who = Who {
        caller: &caller,
        headers: &headers,
        peer,
    };
    audit(&state, who, action, "alert", id.to_string(), None, None).await?;
    Ok(json_reply(StatusCode::OK, &record))
}

/// `POST /api/alerts/{id}/ack`.
pub async fn acknowledge(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    operate(state, caller, headers, peer, &id, Operation::Acknowledge).await
}

/// `POST /api/alerts/{id}/resolve`.
pub async fn resolve(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    operate(state, caller, headers, peer, &id, Operation::Resolve).await
}

/// `GET /api/alerts/rules`.
pub async fn list_rules(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
) -> Result<Response, ApiError> {
    let items: Vec<Value> = state
        .alerts
        .registry
        .all()
        .iter()
        .map(|r| r.to_json())
        .collect();
    Ok(json_reply(
        StatusCode::OK,
        &json!({ "items": items, "channels": state.alerts.channels }),
    ))
}

fn rule_or_404(state: &SharedState, id: &str) -> Result<std::sync::Arc<Rule>, ApiError> {
    let id = parse_id(id)?;
    state
        .alerts
        .registry
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no alert rule with id {id}")))
}

/// `GET /api/alerts/rules/{id}`.
pub async fn get_rule(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rule = rule_or_404(&state, &id)?;
    Ok(json_reply(StatusCode::OK, &rule.to_json()))
}

fn read_rule(body: &[u8], id: Uuid, created: Timestamp) -> Result<Rule, ApiError> {
    let spec = parse_spec(body).map_err(|e| ApiError::field(&e.field, e.reason))?;
    Rule::new(id, spec, RuleSource::Api, created, Timestamp::now())
        .map_err(|e| ApiError::field(&e.field, e.reason))
}

fn name_taken(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!("name: a rule named {name:?} exists already"),
    )
}

fn config_owned(rule: &Rule) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "rule {:?} comes from the configuration (alert_rules); change it there",
            rule.spec.name
        ),
    )
}

async fn reload(state: &SharedState) -> Result<(), ApiError> {
    Alerting::reload(&state.alerts, &state.db)
        .await
        .map_err(db_error)
}

/// `POST /api/alerts/rules`.
pub async fn create_rule(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let now = Timestamp::now();
    let rule = read_rule(&body, Uuid::now_v7(), now)?;
    if let Err(error) = state.db.insert_alert_rule(&Alerting::stored(&rule)).await {
        return Err(if is_unique_violation(&error) {
            name_taken(&rule.spec.name)
        } else {
            db_error(error)
        });
    }
    reload(&state).await?;
    let json = rule.to_json();
    audit(
        &state,
        Who {
            caller: &caller,
            headers: &headers,
            peer,
        },
        "alert_rule.created",
        "alert_rule",
        rule.id.to_string(),
        None,
        Some(json.clone()),
    )
    .await?;
    Ok(json_reply(StatusCode::CREATED, &json))
}

/// `PUT /api/alerts/rules/{id}`: replaces the rule (its windows start over).
pub async fn update_rule(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let old = rule_or_404(&state, &id)?;
    if old.source == RuleSource::Config {
        return Err(config_owned(&old));
    }
    let rule = read_rule(&body, old.id, old.created_at)?;
    match state.db.update_alert_rule(&Alerting::stored(&rule)).await {
        Ok(true) => {}
        Ok(false) => return Err(ApiError::not_found(format!("no alert rule with id {id}"))),
        Err(error) if is_unique_violation(&error) => return Err(name_taken(&rule.spec.name)),
        Err(error) => return Err(db_error(error)),
    }
    reload(&state).await?;
    let json = rule.to_json();
    audit(
        &state,
        Who {
            caller: &caller,
            headers: &headers,
            peer,
        },
        "alert_rule.updated",
        "alert_rule",
        rule.id.to_string(),
        Some(old.to_json()),
        Some(json.clone()),
    )
    .await?;
    Ok(json_reply(StatusCode::OK, &json))
}

/// `DELETE /api/alerts/rules/{id}`: its open alerts resolve at the next check.
pub async fn delete_rule(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let old = rule_or_404(&state, &id)?;
    if old.source == RuleSource::Config {
        return Err(config_owned(&old));
    }
    state.db.delete_alert_rule(old.id).await.map_err(db_error)?;
    reload(&state).await?;
    audit(
        &state,
        Who {
            caller: &caller,
            headers: &headers,
            peer,
        },
        "alert_rule.deleted",
        "alert_rule",
        old.id.to_string(),
        Some(old.to_json()),
        None,
    )
    .await?;
    Ok(json_reply(
        StatusCode::OK,
        &json!({ "id": old.id, "deleted": true }),
    ))
}
