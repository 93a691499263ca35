"""A stand-in for IAM's evaluation of identity policies, for SSM requests.

moto evaluates identity policies with the resource "*" for SSM and no
request context (tests/support/iam/prototype.py shows it), so a policy that
scopes ssm:GetParameter to parameter ARNs, or to a tag compared with the
caller's `ec2:SourceInstanceARN`, cannot be tested there. moto_locked.py
hands SSM requests signed by a registered access key to `decide` below
before moto sees them.

Modelled on AWS's documentation of policy evaluation (IAM User Guide:
"Policy evaluation logic", "IAM JSON policy elements: Condition operators",
"IAM policy elements: Variables and tags") for one account and identity
policies only:

* a request is allowed when some Allow statement matches and no Deny
  statement does (an explicit deny wins; no match is an implicit deny);
* a statement matches when its Action, its Resource and every operator of
  its Condition match;
* Action: case-insensitive, `*` and `?` wildcards; Resource: case-sensitive,
  the same wildcards, after policy variables (`${key}`) are replaced by the
  request context's values; a variable whose key is absent makes the
  element not match;
* Condition: every operator, every key of an operator (AND), any value of
  a key (OR); values may hold policy variables; StringEquals,
  StringNotEquals, StringEqualsIgnoreCase, StringLike, StringNotLike, Bool,
  Null, and the `...IfExists` forms. A key absent from the context fails
  a positive operator, passes a negated one and an `IfExists` one.

The request context: what the principal was registered with (e.g.
`ec2:SourceInstanceARN`, which AWS sets on requests signed with an
instance profile's credentials), plus the parameter's tags as
`ssm:resourceTag/<key>` and `aws:ResourceTag/<key>`, and a PutParameter's
tags as `aws:RequestTag/<key>`.
"""

import fnmatch
import re


def _wild(pattern, value, ignore_case):
    if ignore_case:
        pattern, value = pattern.lower(), value.lower()
    # fnmatch's [] classes are not IAM's: escape them.
    pattern = pattern.replace("[", "[[]")
    return fnmatch.fnmatchcase(value, pattern)


_VAR = re.compile(r"\$\{([^}]+)\}")


def substitute(text, context):
    """`text` with its policy variables replaced; None when one's key is
    absent from the context (AWS's `${*}`, `${?}`, `${$}` are the
    literal characters)."""
    missing = []

    def one(m):
        key = m.group(1)
        if key in ("*", "?", "$"):
            return key
        if key not in context:
            missing.append(key)
            return ""
        return str(context[key])

    out = _VAR.sub(one, text)
    return None if missing else out


def _list(v):
    return v if isinstance(v, list) else [v]


def _condition(block, context):
    for op, keys in (block or {}).items():
        if_exists = op.endswith("IfExists")
        base = op[: -len("IfExists")] if if_exists else op
        for key, values in keys.items():
            present = key in context
            if base == "Null":
                want = str(_list(values)[0]).lower() == "true"
                if present == want:
                    return False
                continue
            if not present:
                if if_exists or base.startswith("StringNot"):
                    continue
                return False
            actual = str(context[key])
            vals = [substitute(str(v), context) for v in _list(values)]
            vals = [v for v in vals if v is not None]
            if base == "StringEquals":
                ok = actual in vals
            elif base == "StringNotEquals":
                ok = actual not in vals
            elif base == "StringEqualsIgnoreCase":
                ok = actual.lower() in [v.lower() for v in vals]
            elif base == "StringLike":
                ok = any(_wild(v, actual, False) for v in vals)
            elif base == "StringNotLike":
                ok = not any(_wild(v, actual, False) for v in vals)
            elif base == "Bool":
                ok = actual.lower() in [v.lower() for v in vals]
            else:
                # An operator this stand-in does not know: no match (for an
                # Allow, the safe side).
                ok = False
            if not ok:
                return False
    return True


def _matches(statement, action, resource, context):
    if not any(_wild(a, action, True) for a in _list(statement.get("Action", []))):
        return False
    resources = [substitute(r, context) for r in _list(statement.get("Resource", []))]
    if not any(r is not None and _wild(r, resource, False) for r in resources):
        return False
    return _condition(statement.get("Condition"), context)


def decide(policy, action, resource, context):
    """"allow", or "deny" (explicit or implicit), for one request."""
    allowed = False
    for st in _list(policy.get("Statement", [])):
        if not _matches(st, action, resource, context):
            continue
        if st.get("Effect") == "Deny":
            return "deny"
        if st.get("Effect") == "Allow":
            allowed = True
    return "allow" if allowed else "deny"
