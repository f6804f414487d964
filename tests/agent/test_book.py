"""The run book as pure bookkeeping: sequence checks, run lifecycle, indexes, params, collisions."""

from __future__ import annotations

from dashcar.agent.book import DUPLICATE, MAX_GONE_PRODUCERS, NEW, REFILL, Book, Run


def make_book(existing: int = 0) -> Book:
    return Book(lambda root, prefix, path: Run(path, root, prefix, created_at="t0"), lambda run, folder, name: existing,
                wall=lambda: 1.7e9)


def test_duplicates_and_gaps_are_counted_for_the_run_that_revealed_them() -> None:
    book = make_book()
    p = book.producer(7, 100)
    run = book.run("/d", "a/b", "/d/a/b")
    assert [book.admit(p, seq, run) for seq in (1, 2, 2, 6, 4, 4, 7, 1)] == [NEW, NEW, DUPLICATE, NEW, REFILL, DUPLICATE, NEW,
                                                                            DUPLICATE]
    assert run.counters == {"duplicates": 3, "missing": 2, "recovered": 1}, "3 and 5 still missing; 4 came back"
    assert p.gaps == [[3, 3, "/d/a/b"], [5, 5, "/d/a/b"]]
    assert book.counters == run.counters


def test_a_refilled_frame_adds_its_data_but_never_reopens_a_run_its_producer_closed() -> None:
    book = make_book()
    run = book.run("/d", "a/b", "/d/a/b")
    p = book.producer(7, 100)
    for seq in (1, 3):
        book.attach(p, 7, run, book.admit(p, seq, run))
    book.close_run(7, p, run, "completed", None, 0)
    assert run.status == "completed"
    admitted = book.admit(p, 2, run)
    book.attach(p, 7, run, admitted)
    assert admitted == REFILL and run.status == "completed" and run.counters["missing"] == 0


def test_a_run_closes_when_its_last_producer_closes_with_the_worst_status() -> None:
    book = make_book()
    run = book.run("/d", "a/b", "/d/a/b")
    p1, p2 = book.producer(1, 100), book.producer(2, 101)
    for sid, p in ((1, p1), (2, p2)):
        book.attach(p, sid, run)
        book.open_run(sid, run, {"name": "b"})
    book.close_run(1, p1, run, "failed", "ValueError: boom", 0)
    assert run.status == "running", "one producer is still open"
    book.close_run(2, p2, run, "completed", None, 3)
    assert (run.status, run.reason, run.closed_at) == ("failed", "ValueError: boom", "2023-11-14T22:13:20Z")
    assert run.counters["dropped_by_producer"] == 3
    assert book.settle == {"/d/a/b"}, "a close settles the run's rows"
    book.attach(p1, 1, run)
    assert (run.status, run.reason, run.closed_at) == ("running", None, None), "a later frame reopens it"


def test_a_producer_that_dies_crashes_its_runs_and_its_queued_frames_are_counted() -> None:
    book = make_book()
    run = book.run("/d", "a/b", "/d/a/b")
    p = book.producer(9, 100)
    book.open_run(9, run, {})
    for seq in (1, 2, 3):
        book.admit(p, seq, run)
        book.attach(p, 9, run)
    book.producer_gone(9, last_sent=5, dropped=1, pending=4)
    assert run.status == "crashed" and "ended without closing" in (run.reason or "")
    assert run.counters == {"lost_in_producer_queue": 6, "dropped_by_producer": 1, "producers_died": 1}
    assert book.live_pids() == {}


def test_ended_producers_are_forgotten_past_the_bound_oldest_first() -> None:
    book = make_book()
    for sid in range(1, MAX_GONE_PRODUCERS + 3):
        book.producer(sid, 100)
        book.producer_gone(sid, 0, 0, 0)
    assert len(book.producers) == MAX_GONE_PRODUCERS
    assert book.forgotten_producers == {1, 2} and 1 not in book.producers


def test_series_continue_from_what_the_run_already_has_and_logs_are_numbered() -> None:
    book = make_book(existing=10)
    run = book.run("/d", "a/b", "/d/a/b")
    assert book.next_indexes(run, "metrics", "loss", 3) == 10
    assert book.next_indexes(run, "metrics", "loss", 2) == 13
    assert book.next_indexes(run, "metrics", None, 1) == 10, "the unnamed metric is its own series"
    assert book.next_indexes(run, "tracks", "loss", 1) == 10, "a DreamLake series is not a metric of the same name"
    assert (book.next_log_seqs(run, 2), book.next_log_seqs(run, 1)) == (0, 2)


def test_params_merge_flattened_and_count_versions() -> None:
    book = make_book()
    run = book.run("/d", "a/b", "/d/a/b")
    assert book.set_params(run, {"model": {"lr": 0.1, "depth": 3}}) == {"model.lr": 0.1, "model.depth": 3}
    assert book.set_params(run, {"model": {"lr": 0.2}, "seed": 1}) == {"model.lr": 0.2, "seed": 1}
    assert run.params == {"model.lr": 0.2, "model.depth": 3, "seed": 1} and run.params_version == 2


def test_topics_whose_folders_collide_cannot_share_a_run() -> None:
    book = make_book()
    run = book.run("/d", "a/b", "/d/a/b")
    assert book.topic_allowed(run, "robot/state") and book.topic_allowed(run, "robot/state")
    assert not book.topic_allowed(run, "robot_state")
    assert run.counters == {"rejected_topic_collision": 1}


def test_a_run_survives_its_stored_form() -> None:
    book = make_book()
    run = book.run("/d", "a/b", "/d/a/b")
    p = book.producer(3, 100)
    book.attach(p, 3, run)
    book.set_params(run, {"x": 1})
    book.next_indexes(run, "metrics", "m", 4)
    assert Run.from_state(run.path, run.to_state()) == run
    book.forget_runs([run.path])
    assert run.path not in book.runs and p.runs == [] and 3 in book.dirty_producers
