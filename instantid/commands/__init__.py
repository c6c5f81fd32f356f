"""The command line (`python -m instantid …`) and what only it needs: `cli` (the commands),
`runner` (run a workflow in-process or on a server), `embedded` (ComfyUI in this process), `doctor`
(setup checks), `fetch` and `catalog` (the model files and their download), `comfy_home` (finding
ComfyUI). This side imports the domain (`instantid.*`); the domain and the nodes never import it."""
