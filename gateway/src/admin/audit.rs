//! `GET /admin/audit`: the audit trail, filtered and paged.
//!
//! Pages are ordered by chain position (oldest first) and continued with the opaque
//! cursor `after_seq` each page returns; a filter that does not parse is a 400 naming the
//! parameter.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};

use crate::audit::{AuditError, AuditFilter, FilterError, Page, RawFilter};
use crate::error::ApiError;
use crate::state::AppState;

/// `GET /admin/audit?action=login.*&actor=…&target=…&since=…&until=…&after_seq=…&limit=…`
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<RawFilter>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(raw) = query.map_err(|e| {
        AuditError::Filter(FilterError {
            field: "query",
            message: e.body_text(),
        })
    })?;
    let filter = AuditFilter::parse(raw).map_err(AuditError::from)?;
    let page = crate::audit::list(&state.db, &filter)
        .await
        .map_err(AuditError::from)?;
    Ok(Json(page))
}
