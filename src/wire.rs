//! Generated protobuf types (proto/symphony/v1).
