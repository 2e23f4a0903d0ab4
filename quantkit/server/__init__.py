"""The OpenAI-compatible HTTP server (`quantkit serve`): FastAPI app, protocol models, metrics."""
