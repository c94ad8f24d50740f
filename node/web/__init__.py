"""The operator console: web pages for the people who run and read the node (docs/console.md).

- :mod:`node.web.auth` — roles, argon2 passwords, login tokens, CSRF tokens, the login limit.
- :mod:`node.web.views` — what each page shows, as plain data (the pages and /api share it).
- :mod:`node.web.app` — the Starlette routes, the permission checks and the operator actions.
- :mod:`node.web.process` — the console's own process under `serve` (uvicorn).

Nothing here imports torch: the console runs beside the receiver on hosts without a GPU.
"""
