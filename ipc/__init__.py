"""The wire: message types, endpoints and the shared-memory tensor arena."""
