"""Serving: a continuous-batching engine over `kitelm.generate`'s sampling, kept inference states, chat templates and
an OpenAI-compatible HTTP app (`kitelm serve`), plus the terminal chat (`kitelm chat`)."""
