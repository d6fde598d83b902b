"""Chain phases (convert, crypt, bundle): where the phase must take the image,
and the shortest chain of accepting hooks that takes it there."""

import os


class PlanError(Exception):
    """No chain of the elements' hooks does the job (exit 2: a wrong element list)."""


def target(phase, env):
    """(source, target) a chain phase must get from and to, or None when it has nothing to do."""
    if not env.get("IMG_OUTPUT"):
        return None
    output_type = env["IMG_OUTPUT_TYPE"]
    if phase.chain_target == "image-type":
        current = env["IMG_IMAGE_TYPE"]
        if output_type == "bundle":
            wanted = current if current in ("raw", "partition") else "raw"
            return (current, wanted) if wanted != current else None
        return current, output_type
    if phase.chain_target == "crypt":
        current, wanted = env.get("IMG_IMAGE_CRYPT", "none"), env.get("IMG_OUTPUT_CRYPT", "none")
        return (current, wanted) if current != wanted else None
    if phase.chain_target == "bundle":
        return (env["IMG_IMAGE_TYPE"], "bundle") if output_type == "bundle" else None
    return None


def is_last_writer(phase, phases, selected, env):
    """Whether no chain phase after `phase` (of `phases`, those in `selected`) has work:
    then its last hook writes the output itself."""
    names = [p.name for p in phases]
    later = names[names.index(phase.name) + 1:]
    return not any(p.kind == "chain" and p.name in later and p.name in selected and target(p, env)
                   for p in phases)


def plan(phase, hooks_here, source, target_, accepts, element_names=()):
    """The shortest chain of hooks from source to target, as [(hook, from, to)];
    ties go to hook order.  accepts(hook, from, to) -> bool says whether a hook
    takes one step (asked at most once per step)."""
    src_key, dst_key = phase.context
    types = {target_}
    for hook in hooks_here:
        types.update(t for t in hook.header.get("accepts-" + dst_key, "").split() if t != "*")
    types = sorted(types)
    cache = {}

    def edge(hook, s, d):
        if phase.pair_through and phase.pair_through not in (s, d):
            return False  # a crypt hook only ever encrypts or decrypts
        if (hook.name, s, d) not in cache:
            cache[hook.name, s, d] = accepts(hook, s, d)
        return cache[hook.name, s, d]

    for hook in hooks_here:  # one hook for the whole way, if any
        if edge(hook, source, target_):
            return [(hook, source, target_)]
    previous, frontier = {source: None}, [source]
    while frontier and target_ not in previous:
        following = []
        for s in frontier:
            for hook in hooks_here:
                for d in types:
                    if d not in previous and d != s and edge(hook, s, d):
                        previous[d] = (hook, s)
                        following.append(d)
        frontier = following
    if target_ not in previous:
        raise PlanError(f"{phase.name}: no hook of the elements ({', '.join(element_names)}) converts "
                        f"{source} to {target_}, alone or in a chain")
    chain, step = [], target_
    while previous[step]:
        hook, s = previous[step]
        chain.append((hook, s, step))
        step = s
    return chain[::-1]


def free(path):
    """Bytes an unprivileged writer may still use on the filesystem of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def short_of_space(checks):
    """checks: (bytes needed, directory, what the free bytes are called).  The first
    check that does not fit, as (need, where, have, what), else None."""
    for need, where, what in checks:
        have = free(where)
        if need > have:
            return need, where, max(have, 0), what
    return None
