"""The real-time controller: chunk execution, delay estimation, the six modes, safety.

A layer above `policies/` (it uses a policy only through its public methods), beside
`evaluation/` (whose rollout runs its chunk execution). See docs/ARCHITECTURE.md (control/).
"""
