"""consumers.deadlines: the queue against a plain dict model (hypothesis), and its memory bound."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consumers.deadlines import Deadlines

keys = st.sampled_from([f"k{i}" for i in range(8)])
times = st.integers(0, 50).map(float)
ops = st.lists(st.one_of(
    st.tuples(st.just("set"), keys, times),
    st.tuples(st.just("discard"), keys, st.just(0.0)),
    st.tuples(st.just("pop"), st.just(""), times),
), max_size=80)


@given(ops)
def test_the_queue_behaves_as_a_dict_of_due_times(script: list[tuple[str, str, float]]) -> None:
    due: Deadlines[str] = Deadlines()
    model: dict[str, float] = {}
    for op, key, at in script:
        if op == "set":
            due.set(key, at)
            model[key] = at
        elif op == "discard":
            due.discard(key)
            model.pop(key, None)
        else:
            popped = due.pop_due(at)
            expected = {k for k, t in model.items() if t <= at}
            assert set(popped) == expected
            assert [model[k] for k in popped] == sorted(model[k] for k in popped)  # earliest first
            for k in popped:
                del model[k]
        assert len(due) == len(model)
        assert due.next_at() == (min(model.values()) if model else None)
        assert {k: due.get(k) for k in model} == model


def test_rescheduling_one_key_forever_keeps_the_heap_small() -> None:
    due: Deadlines[str] = Deadlines()
    for i in range(100_000):
        due.set("a", float(i))
        due.set(f"b{i % 10}", float(i))
    assert len(due) == 11
    assert len(due._heap) <= 2 * 11 + 64 + 1
    assert due.pop_due(99_999.0)[-1] in {"a", "b9"}
