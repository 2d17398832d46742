"""gc_pauses: what a model load makes sets off no full garbage collection, and is frozen out of later ones."""

from __future__ import annotations

import gc
import threading

from owl_desktop.gui import gc_pauses


def test_many_new_objects_set_off_no_full_collection_while_held_and_are_frozen_after() -> None:
    threshold = gc.get_threshold()
    generations: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    kept: list[object] = []
    frozen = gc.get_freeze_count()
    gc.callbacks.append(seen)
    try:
        with gc_pauses.no_full_collections():
            with gc_pauses.no_full_collections():  # nested, as a second thread's hold would be
                pass
            assert gc.get_threshold() != threshold
            for i in range(300_000):  # like the first load's imports: ~300,000 new long-lived objects
                kept.append([i])  # a list is always tracked by the collector
    finally:
        gc.callbacks.remove(seen)
    assert 0 in generations and 2 not in generations  # young collections went on; no full one
    assert gc.get_freeze_count() >= frozen + len(kept)
    assert gc.get_threshold() == threshold


def test_holds_from_two_threads_restore_the_thresholds_once_both_end() -> None:
    threshold = gc.get_threshold()
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with gc_pauses.no_full_collections():
            inside.set()
            leave.wait(10)

    other = threading.Thread(target=hold)
    other.start()
    assert inside.wait(10)
    with gc_pauses.no_full_collections():
        pass
    assert gc.get_threshold() != threshold  # the other thread still holds
    leave.set()
    other.join(10)
    assert gc.get_threshold() == threshold
