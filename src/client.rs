//! Client commands against the HTTP API.
