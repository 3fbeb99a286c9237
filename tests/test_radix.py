"""The prefix cache's radix tree on its own: matching, splitting, locking and least-recently-used eviction."""

from __future__ import annotations

from serve.scheduler.radix import RadixCache


def test_match_returns_the_longest_cached_prefix_and_splits_edges():
    cache = RadixCache()
    assert cache.insert([1, 2, 3, 4], [10, 11, 12, 13])[0] == 0
    slots, _ = cache.match([1, 2, 9])
    assert slots == [10, 11]  # the edge [1, 2, 3, 4] was split after two tokens
    # A second sequence sharing [1, 2]: only its own tail is new; the caller keeps its duplicate slots.
    done, _ = cache.insert([1, 2, 7], [20, 21, 22])
    assert done == 2
    assert cache.match([1, 2, 7, 8])[0] == [10, 11, 22]
    assert cache.match([5])[0] == []
    assert cache.size == 5 and cache.evictable == 5


def test_locked_nodes_survive_eviction_and_oldest_leaves_go_first():
    cache = RadixCache()
    cache.insert([1, 2, 3], [1, 2, 3])
    cache.insert([4, 5], [4, 5])
    cache.insert([6, 7], [6, 7])
    _, in_use = cache.match([1, 2, 3])  # most recently used, and locked by a running request
    cache.lock(in_use)
    assert cache.locked == 3 and cache.evictable == 4
    cache.match([6, 7])  # touched after [4, 5]
    assert sorted(cache.evict(1)) == [4, 5]  # the least recently used unlocked leaf
    assert sorted(cache.evict(100)) == [6, 7]  # everything unlocked, but nothing locked
    assert cache.match([1, 2, 3])[0] == [1, 2, 3]
    cache.unlock(in_use)
    assert cache.evictable == 3 and sorted(cache.evict(3)) == [1, 2, 3]
    assert cache.size == 0


def test_evicting_a_leaf_frees_its_parent_once_the_parent_is_a_leaf():
    cache = RadixCache()
    cache.insert([1, 2, 3], [1, 2, 3])
    cache.insert([1, 2, 4], [1, 2, 9])  # splits into [1, 2] -> {[3], [4]}
    assert cache.evict(1) == [3]  # the older leaf
    assert sorted(cache.evict(2)) == [1, 2, 9]  # [4], then [1, 2], which became a leaf
    assert cache.size == 0 and cache.match([1, 2, 4])[0] == []
