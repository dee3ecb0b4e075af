"""Test doubles: loopback HTTP servers that stand in for the services atlas talks to, so that
the real clients (the providers' SDKs, the environment client) run against them with no key and
no network. The product never imports them at run time; the tests, ``bench/`` and dry runs do.

- ``fake_provider``: the OpenAI and Anthropic APIs (chat completions, messages, batches), with
  scripted faults (:class:`~atlas.testing.fake_provider.FakeProvider`);
- ``envserver``: one of atlas's environments behind AgentGym's environment-server protocol,
  with faults on demand (:class:`~atlas.testing.envserver.EnvServer`).
"""
