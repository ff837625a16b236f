//! Durable state (sqlx, SQLite by default).
