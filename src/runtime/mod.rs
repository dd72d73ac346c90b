pub mod idrange;
