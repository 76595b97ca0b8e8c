"""A Hypothesis state machine for tags: three TieredCache instances on a real Redis, a model.

The model holds, per key, what the cache must answer: the last value written or loaded (with its
tags), or nothing once the key was deleted or one of its tags invalidated. The origin holds the
last value written. Rules: a tagged write, a delete, ``invalidate_tag``, a read-through load with
tags, a load whose loader is overtaken by an invalidation of one of its tags on another instance
(its value must not be stored), a namespace bump. Checked: read-your-writes in the instance that
wrote or invalidated (at once); after a sync (every instance has applied every message), every
instance answers exactly the model, from its local tier or Redis.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.servers import RedisServer, wait_until
from tiercache.tiered import TieredCache

KEYS: list[Hashable] = ["a", "b", ("t", 1)]
TAGS = ["x", "y"]
INSTANCES = 3
OPTIONS: dict[str, Any] = {"namespace": "tagmodel", "ttl": 300.0, "health_timeout": 5.0}

instances = st.integers(0, INSTANCES - 1)
keys = st.sampled_from(KEYS)
tag_sets = st.frozensets(st.sampled_from(TAGS), max_size=2)
tags = st.sampled_from(TAGS)


class TagMachine(RuleBasedStateMachine):
    """Writes, deletes, tag invalidations and loads on three instances; the model of the answer."""

    url = ""

    def __init__(self) -> None:
        super().__init__()
        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()
        self.caches = [TieredCache(self.url, **OPTIONS) for _ in range(INSTANCES)]
        for cache in self.caches:
            assert cache.wait_ready(10.0)
        self.model: dict[Hashable, tuple[Any, frozenset[str]] | None] = dict.fromkeys(KEYS)
        self.origin: dict[Hashable, Any] = {}
        self.counter = itertools.count()
        self.messages = 0  # invalidation messages published (each instance applies them all)

    def teardown(self) -> None:
        for cache in self.caches:
            cache.close()

    def _answer(self, key: Hashable) -> Any:
        entry = self.model[key]
        return None if entry is None else entry[0]

    def _invalidated(self, tag: str) -> None:
        for key, entry in self.model.items():
            if entry is not None and tag in entry[1]:
                self.model[key] = None

    @rule(i=instances, key=keys, with_tags=tag_sets)
    def write(self, i: int, key: Hashable, with_tags: frozenset[str]) -> None:
        value = next(self.counter)
        self.caches[i].set(key, value, tags=tuple(with_tags))
        self.messages += 1
        self.model[key] = (value, with_tags)
        self.origin[key] = value
        assert self.caches[i].get(key) == value  # read-your-writes

    @rule(i=instances, key=keys)
    def delete(self, i: int, key: Hashable) -> None:
        self.caches[i].invalidate(key)
        self.messages += 1
        self.model[key] = None
        self.origin.pop(key, None)
        assert self.caches[i].get(key) is None

    @rule(i=instances, tag=tags)
    def invalidate_tag(self, i: int, tag: str) -> None:
        self.caches[i].invalidate_tag(tag)
        self.messages += 1
        self._invalidated(tag)
        for key in KEYS:
            assert self.caches[i].get(key) == self._answer(key), key

    @rule(i=instances, key=keys, with_tags=tag_sets)
    def load(self, i: int, key: Hashable, with_tags: frozenset[str]) -> None:
        cache = self.caches[i]
        expected = self._answer(key)
        value = cache.get_or_load(key, lambda k: self.origin.get(k), tags=tuple(with_tags))
        if expected is not None:
            assert value == expected  # a hit
        else:
            assert value == self.origin.get(key)
            self.model[key] = (value, with_tags)  # (a stored None is a value like another)

    @rule(i=instances, j=instances, key=keys, tag=tags)
    def load_overtaken(self, i: int, j: int, key: Hashable, tag: str) -> None:
        self.caches[i].invalidate(key)  # a miss, so the loader runs
        self.messages += 1
        self.model[key] = None

        def loader(k: Hashable) -> Any:
            value = self.origin.get(k)
            self.caches[j].invalidate_tag(tag)  # the origin "changed" meanwhile
            return value

        assert self.caches[i].get_or_load(key, loader, tags=(tag,)) == self.origin.get(key)
        self.messages += 1
        self._invalidated(tag)  # and the loaded value was not stored

    @rule(i=instances)
    def bump_namespace(self, i: int) -> None:
        self.caches[i].bump_namespace()
        self.messages += 1
        for key in KEYS:
            self.model[key] = None
        assert all(self.caches[i].get(key) is None for key in KEYS)

    def _sync(self) -> None:
        """Wait until every instance has applied every message (a sentinel write's included)."""
        self.caches[0].set("sentinel", next(self.counter))
        self.messages += 1
        for cache in self.caches:
            wait_until(
                lambda c=cache: c.stats()["invalidations_received"] >= self.messages,
                10,
                interval=0.001,
                message="an instance applied every message",
            )

    @invariant()
    def every_instance_answers_the_model(self) -> None:
        self._sync()
        for n, cache in enumerate(self.caches):
            for key in KEYS:
                assert cache.get(key) == self._answer(key), (n, key)


@pytest.fixture
def machine_url(shared_redis: RedisServer) -> Iterator[str]:
    yield shared_redis.url


def test_tags_state_machine(machine_url: str) -> None:
    TagMachine.url = machine_url
    run_state_machine_as_test(
        TagMachine,
        settings=settings(
            max_examples=15,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.slow
def test_tags_state_machine_long(machine_url: str) -> None:
    TagMachine.url = machine_url
    run_state_machine_as_test(
        TagMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
