"""The OpenAI-compatible HTTP server: request models and error shapes (`protocol`), limits and
hosts (`guard`), routes over the engine (`app`), the OpenAPI document (`openapi`), uvicorn
(`server`), and the chat page (`static/`)."""
