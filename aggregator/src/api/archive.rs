//! `/api/archive…`: the days the archive holds, and bringing one back for queries (admin,
//! recorded in the audit trail).

use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::json;

use super::{Admin, Reader, SharedState, Who, audit, json as json_reply};
use crate::archive::{Archive, ArchiveError};
use crate::error::ApiError;

fn archive(state: &SharedState) -> Result<Arc<Archive>, ApiError> {
    state
        .archive
        .clone()
        .ok_or_else(|| ApiError::not_found("the archive: archiving is off (ARCHIVE_URL is unset)"))
}

fn day(text: &str) -> Result<i64, ApiError> {
    crate::index::parse_day_name(text)
        .ok_or_else(|| ApiError::field("day", format!("expected YYYY-MM-DD, got {text:?}")))
}

fn archive_error(error: ArchiveError) -> ApiError {
    match error {
        ArchiveError::NotArchived(day) => ApiError::not_found(format!("{day} in the archive")),
        ArchiveError::Store(error) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("the archive store failed: {error}"),
        ),
        other => ApiError::internal("the archive failed", other),
    }
}

/// `GET /api/archive`: the archived days, oldest first.
pub async fn list(
    State(state): State<SharedState>,
    Reader(_caller): Reader,
) -> Result<Response, ApiError> {
    let archive = archive(&state)?;
    let days = archive.list().await.map_err(archive_error)?;
    Ok(json_reply(StatusCode::OK, &json!({"days": days})))
}

/// `POST /api/archive/{day}/restore`: downloads the day and opens it read-only.
pub async fn restore(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(text): Path<String>,
) -> Result<Response, ApiError> {
    let who = Who {
        caller: &caller,
        headers: &headers,
        peer,
    };
    act(&state, who, &text, true).await
}

/// `DELETE /api/archive/{day}/restore`: drops the restored copy (the archive keeps the day).
pub async fn unrestore(
    State(state): State<SharedState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(text): Path<String>,
) -> Result<Response, ApiError> {
    let who = Who {
        caller: &caller,
        headers: &headers,
        peer,
    };
    act(&state, who, &text, false).await
}

/// Restores `text`'s day, or drops its restored copy, and records it in the audit trail.
async fn act(
    state: &SharedState,
    who: Who<'_>,
    text: &str,
    restore: bool,
) -> Result<Response, ApiError> {
    let archive = archive(state)?;
    let day = day(text)?;
    let (parts, action, old, new) = if restore {
        let parts = archive.restore(day).await.map_err(archive_error)?;
        (
            parts,
            "archive.restored",
            None,
            Some(json!({"parts": parts})),
        )
    } else {
        let parts = archive.unrestore(day).await.map_err(archive_error)?;
        (
            parts,
            "archive.restore_dropped",
            Some(json!({"parts": parts})),
            None,
        )
    };
    audit(
        state,
        who,
        action,
        "archive_day",
        text.to_string(),
        old,
        new,
    )
    .await?;
    let body = if restore {
        json!({"day": text, "restored": true, "parts": parts})
    } else {
        json!({"day": text, "restored": false, "parts_removed": parts})
    };
    Ok(json_reply(StatusCode::OK, &body))
}
