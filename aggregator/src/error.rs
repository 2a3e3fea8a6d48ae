//! The one place where failures become HTTP responses: `application/problem+json` (RFC 9457)
//! naming the offending field and the reason.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use logging_common::validate::FieldError;
use serde::Serialize;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: detail.into(),
            errors: Vec::new(),
            retry_after_secs: None,
        }
    }

    /// 400 about one field.
    pub fn field(field: &str, reason: impl Into<String>) -> ApiError {
        let reason = reason.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            detail: format!("{field}: {reason}"),
            errors: vec![FieldError::new(field, reason)],
            retry_after_secs: None,
        }
    }

    /// 400 (or another status) about several fields of one entry.
    pub fn fields(status: StatusCode, errors: Vec<FieldError>) -> ApiError {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            status,
            detail,
            errors,
            retry_after_secs: None,
        }
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, what)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a token is required (Authorization: Bearer <token>, or basic auth with the token as the password)",
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, detail)
    }

    /// 429 with `Retry-After`: the store is behind and the client should slow down.
    pub fn backpressure(detail: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, detail)
        }
    }

    /// 500/503 for a failure of ours; the cause goes to our log, not to the client.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "{context}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{context}; see the aggregator's log"),
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        ApiError {
            retry_after_secs: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, detail)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
            errors: &self.errors,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
