"""Prefix cache: a radix tree over token ids whose edges carry the KV slots of those tokens.

A finished (or fully prefilled) request leaves its tokens' KV in the tree instead of freeing it; a new
request whose prompt starts the same way reuses those slots and only computes the rest. Nodes that a
running request relies on are locked (reference-counted up to the root); unlocked leaves are evicted
least recently used first when the pool runs short. One token per slot, so any prefix length matches.
"""

from __future__ import annotations

import heapq
import itertools


class Node:
    _clock = itertools.count()

    def __init__(self, parent: Node | None = None, tokens: list[int] | None = None, slots: list[int] | None = None) -> None:
        self.parent = parent
        self.children: dict[int, Node] = {}  # by first token of the child's edge
        self.tokens = tokens or []
        self.slots = slots or []
        self.refs = 0
        self.touch()

    def touch(self) -> None:
        self.last_used = next(Node._clock)

    def __lt__(self, other: Node) -> bool:  # for the eviction heap
        return self.last_used < other.last_used


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RadixCache:
    def __init__(self) -> None:
        self.root = Node()
        self.root.refs = 1  # never evicted
        self.evictable = 0  # tokens in unlocked nodes: free-able on demand
        self.locked = 0  # tokens in nodes some running request relies on
        self.hits = 0  # prompt tokens served from the cache

    @property
    def size(self) -> int:
        return self.evictable + self.locked

    def match(self, tokens: list[int]) -> tuple[list[int], Node]:
        """KV slots of the longest cached prefix of `tokens`, and the node where it ends."""
        node, slots = self.root, []
        while tokens and tokens[0] in node.children:
            child = node.children[tokens[0]]
            n = _common(child.tokens, tokens)
            if n < len(child.tokens):
                child = self._split(child, n)
            child.touch()
            slots.extend(child.slots)
            node, tokens = child, tokens[n:]
        return slots, node

    def insert(self, tokens: list[int], slots: list[int]) -> tuple[int, Node]:
        """Caches `tokens` with their slots. Returns how many leading tokens were already cached (the
        caller still owns, and must free, its own slots for those) and the node where `tokens` end."""
        node, done = self.root, 0
        while done < len(tokens):
            child = node.children.get(tokens[done])
            if child is None:
                child = Node(node, tokens[done:], slots[done:])
                node.children[tokens[done]] = child
                self.evictable += len(child.tokens)
                return done, child
            n = _common(child.tokens, tokens[done:])
            if n < len(child.tokens):
                child = self._split(child, n)
            child.touch()
            node, done = child, done + n
        return done, node

    def _split(self, child: Node, n: int) -> Node:
        """Cuts `child`'s edge after n tokens; returns the new upper half."""
        upper = Node(child.parent, child.tokens[:n], child.slots[:n])
        upper.refs = child.refs
        upper.children[child.tokens[n]] = child
        child.parent.children[child.tokens[0]] = upper
        child.parent, child.tokens, child.slots = upper, child.tokens[n:], child.slots[n:]
        return upper

    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.refs == 0:
                self.evictable -= len(node.tokens)
                self.locked += len(node.tokens)
            node.refs += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            node.refs -= 1
            if node.refs == 0:
                self.locked -= len(node.tokens)
                self.evictable += len(node.tokens)
            node = node.parent

    def evict(self, n: int) -> list[int]:
        """Frees at least n tokens' slots (fewer if not that many are evictable), oldest leaves first."""
        freed: list[int] = []
        heap = [leaf for leaf in self._leaves() if leaf.refs == 0]
        heapq.heapify(heap)
        while heap and len(freed) < n:
            leaf = heapq.heappop(heap)
            freed.extend(leaf.slots)
            self.evictable -= len(leaf.tokens)
            parent = leaf.parent
            del parent.children[leaf.tokens[0]]
            if parent is not self.root and not parent.children and parent.refs == 0:
                heapq.heappush(heap, parent)
        return freed

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children and node is not self.root:
                out.append(node)
        return out
