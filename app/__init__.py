"""GLM Studio's application layer: what the web pages, the terminal chat and the HTTP API share.

Streamlit-free. `runtime` holds the process-wide objects (the model service, the store, the services below);
`chat` is the one path of a chat turn; `access` says who may do what (operator, guests) and signs visitor ids;
`bench_jobs` runs benchmarks in the background; `api` is the OpenAI-compatible HTTP API; `server` puts the API and
the access checks in front of Streamlit's own server. Imports go down only: app -> storage, glm_core.
"""
