//! The OAuth 2.0 endpoints: token (one module per grant), introspection, revocation,
//! discovery. Handlers parse and authenticate at the edge and call the domain modules
//! (`clients`, `refresh`, `keys`); every refusal is an [`ApiError::OAuth`](crate::error::ApiError).

pub mod claims;
pub mod client_auth;
pub mod discovery;
pub mod form;
pub mod introspect;
pub mod refresh_grant;
pub mod revoke;
pub mod token;
