"""The coordinator: owner of the model table, worker liveness and readiness."""
