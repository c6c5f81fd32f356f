"""The command line (`python -m instantid …`) and what only it needs: `cli` (the commands; `errors` the
base of their expected failures), `runner` (run a workflow in-process or on a server), `embedded`
(ComfyUI in this process), `portrait` (one command from a photo to an image) with `image_files` (its
photos checked before any install), `bootstrap` (find or install ComfyUI, link the pack), `batch` (many
jobs over several servers), `doctor` (setup checks) with `workflow_models` (the models a workflow
loads), `fetch` (the catalog's model files downloaded), `comfy_home` (finding ComfyUI),
`model_folders` (the model folders every command uses). The shipped workflows' generator is a build
tool outside the runtime package (`workflow_tools/`, run by `scripts/build_workflows.py`). This side
imports the domain (`instantid.*`); the domain and the nodes never import it."""
