//! End-to-end tests across cmg's roles live in `tests/`: real TLS on loopback ports, real
//! databases (SQLite, and PostgreSQL when `CMG_TEST_POSTGRES` is set), no mocks of our own
//! components. This library is empty on purpose.
