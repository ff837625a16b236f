//! Configuration files (the original's YAML keys plus ours).
