"""HTTP frontends: FastAPI on uvicorn, dispatching to workers through shared memory."""
