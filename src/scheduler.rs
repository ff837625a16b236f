//! Pure placement: see module docs.
