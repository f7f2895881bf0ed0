"""The prefix index as a radix tree of blocks (SGLang's RadixAttention structure).

Where the hash table names a block by a chained hash, the tree names it by its path: the root's
children are keyed by the salt, and below them each edge is one block's P token ids. A node is
a prefix of whole blocks; it holds the block that caches its last P tokens, or nothing. Looking
up a prompt walks down one edge per block and hashes nothing; two prompts that share a prefix
share the path. (SGLang's tree splits edges at any token; here edges are whole blocks, the unit
the pool hands out, so both indexes find exactly the same blocks.)

`RadixIndex` answers the questions `kvlib.engine.blocks.BlockPool` asks of its index:
child(parent, token_ids, salt, create) -> node, get(node), put(node, block), pop(node).
A node whose block is evicted stays while it has children; an empty leaf is pruned (and grown
again if a running request that still names it fills the next block).
"""

from __future__ import annotations


class Node:
    """A prefix of whole blocks: its children by next block's token ids, its cached block."""

    __slots__ = ("parent", "edge", "children", "block")

    def __init__(self, parent: Node | None, edge: object) -> None:
        self.parent = parent
        self.edge = edge  # the token ids (or, under the root, the salt) that lead here
        self.children: dict[object, Node] = {}
        self.block: int | None = None

    def __repr__(self) -> str:
        return f"Node(block={self.block}, children={len(self.children)})"


class RadixIndex:
    """Prefix index as a tree: one edge per block of token ids, under one subtree per salt."""

    def __init__(self) -> None:
        self.root = Node(None, None)
        self._n_blocks = 0
        self.ops = 0  # nodes visited or created

    def child(
        self, parent: Node | None, token_ids: tuple[int, ...], salt: str | None, create: bool
    ):
        """The node of `token_ids` below `parent` (None: the first block); None if absent and
        not `create`."""
        if parent is None:
            parent = self._salt_root(salt, create)
            if parent is None:
                return None
        elif create:
            parent = self._attached(parent)
        self.ops += 1
        node = parent.children.get(token_ids)
        if node is None and create:
            node = parent.children[token_ids] = Node(parent, token_ids)
        return node

    def get(self, node: Node) -> int | None:
        return node.block

    def put(self, node: Node, block: int) -> None:
        if node.block is None:
            self._n_blocks += 1
        node.block = block

    def pop(self, node: Node) -> None:
        """Forget the node's block; prune empty leaves up the path."""
        if node.block is not None:
            self._n_blocks -= 1
        node.block = None
        while node.parent is not None and node.block is None and not node.children:
            if node.parent.children.get(node.edge) is not node:
                break  # already cut off above (see `_attached`)
            del node.parent.children[node.edge]
            node = node.parent

    def __len__(self) -> int:
        return self._n_blocks

    def num_nodes(self) -> int:
        """Nodes in the tree below the root (salt nodes included)."""
        count, stack = 0, list(self.root.children.values())
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count

    def _attached(self, node: Node) -> Node:
        """The node in the tree for `node`'s path. A request keeps the nodes of its blocks; if a
        node was pruned meanwhile (its block evicted), its path is grown again from the root."""
        if node.parent is None:
            return node
        parent = self._attached(node.parent)
        found = parent.children.get(node.edge)
        if found is None:
            found = parent.children[node.edge] = Node(parent, node.edge)
        return found

    def _salt_root(self, salt: str | None, create: bool) -> Node | None:
        node = self.root.children.get(salt)
        if node is None and create:
            node = self.root.children[salt] = Node(self.root, salt)
        return node
