"""Longest chain of project imports in ddpm_jax/ (module-level, and all imports incl. function-local ones;
`if TYPE_CHECKING` blocks excluded), and who imports the loop: `python bench/import_depth.py [ROOT]`."""

import ast
import functools
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "."
mods = {}
for dp, _, fs in os.walk(os.path.join(root, "ddpm_jax")):
    for f in fs:
        if f.endswith(".py"):
            p = os.path.join(dp, f)
            name = os.path.relpath(p, root)[:-3].replace("/", ".").removesuffix(".__init__")
            mods[name] = p


def deps(name, toplevel_only):
    tree = ast.parse(open(mods[name]).read())
    out = set()
    for n in ast.walk(tree):  # drop `if TYPE_CHECKING:` blocks
        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING":
            n.body = []
    nodes = tree.body if toplevel_only else list(ast.walk(tree))
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("ddpm_jax"):
            for a in n.names:
                full = f"{n.module}.{a.name}"
                out.add(full if full in mods else n.module)
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name.startswith("ddpm_jax"):
                    out.add(a.name)
    out.discard(name)
    out.discard("ddpm_jax")
    return {d for d in out if d in mods}


def longest_chain(graph: dict) -> list:
    @functools.cache
    def chain(m, stack=()):
        best = [m]
        for d in graph[m]:
            if d not in stack:
                c = chain(d, stack + (m,))
                best = [m] + c if len(c) + 1 > len(best) else best
        return best

    return max((chain(m) for m in graph), key=len)


for top in (True, False):
    G = {m: deps(m, top) for m in mods}
    longest = longest_chain(G)
    print("module-level only" if top else "all imports", len(longest), " -> ".join(longest))
    if not top:
        print("importers of loop:", sorted(m for m in G if "ddpm_jax.training.loop" in G[m]))
