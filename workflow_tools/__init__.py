"""Build-time tools: the generator of the shipped workflows (workflows/*.json and workflows/api/*.json).
Not part of the runtime package and not in the registry zip; run through scripts/build_workflows.py."""
