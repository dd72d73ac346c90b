#!/usr/bin/python
# -*- coding: utf-8 -*-
# SPDX-License-Identifier: MIT OR Apache-2.0
"""Ansible module rmachines.core.machine: declare an rmachines machine."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: machine
short_description: Declare rmachines machines (definition file and state)
description:
  - Writes the machine's definition as TOML to C(CONFIG_DIR/NAME.toml), makes
    rmachined re-read its definitions, and starts, stops, restarts or removes
    the machine.
  - Talks to rmachined on the managed host's system bus through
    C(rmachinectl --json); needs nothing but Python's standard library there.
  - Fails with rmachined's own error text (a bad definition names the file,
    line and key).
  - A running machine keeps the definition it was started with until it is
    restarted (C(state=restarted), or I(restart_on_change=true)).
version_added: "0.1.0"
options:
  name:
    description: The machine's name (the definition file's stem).
    type: str
    required: true
  definition:
    description:
      - The definition as a dictionary, written as TOML. Keys are those of
        rmachines.toml(5), e.g. C(root), C(boot), C(autostart), and the
        tables C(network), C(users), C(resources), a list C(bind).
      - When neither I(definition) nor I(image) is given, the module does not
        touch the file and only manages the state of a defined machine.
    type: dict
  image:
    description:
      - Shorthand for a definition whose machine runs on an image of
        rmachined's store (C(image = "IMAGE")); merged into I(definition).
    type: str
  state:
    description:
      - C(present) the definition is in place; the machine is neither started
        nor stopped.
      - C(started) and C(stopped) the machine also runs, or not.
      - C(restarted) the machine is stopped if it runs, then started (always
        a change).
      - C(absent) the machine is stopped and its definition removed.
    type: str
    choices: [present, absent, started, stopped, restarted]
    default: present
  restart_on_change:
    description: Restart a running machine when its definition changed.
    type: bool
    default: false
  config_dir:
    description: rmachined's configuration directory (its C(--config-dir)).
    type: path
    default: /etc/rmachines
  rmachinectl:
    description: The rmachinectl program on the managed host.
    type: str
    default: rmachinectl
notes:
  - Supports check mode and diff mode.
  - Runs as a user allowed to start and stop machines (root, or one polkit
    allows), like rmachinectl itself.
author: rmachines developers
"""

EXAMPLES = r"""
- name: The same web machine on every host, its port published
  rmachines.core.machine:
    name: web
    state: started
    definition:
      root: /var/lib/machines/web
      autostart: true
      network:
        ports: ["tcp:8080:80"]
      resources:
        memory: 512M

- name: Gone
  rmachines.core.machine:
    name: old
    state: absent
"""

RETURN = r"""
machine:
  description: The machine as rmachinectl list --json shows it after the task (empty when absent).
  returned: always
  type: dict
definition_path:
  description: The definition file.
  returned: always
  type: str
"""

import json
import math
import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")
BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
ACTIVE_STATES = ("starting", "running", "stopping")


class TomlError(Exception):
    pass


def toml_key(key):
    key = str(key)
    return key if BARE_KEY.match(key) else toml_string(key)


def toml_string(text):
    out = ['"']
    for char in text:
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append("\\u%04X" % code)
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_value(value, where):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise TomlError("%s: %r has no TOML form" % (where, value))
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            "%s = %s" % (toml_key(k), toml_value(v, "%s.%s" % (where, k)))
            for k, v in value.items()
        )
        return "{ " + items + " }" if items else "{}"
    if value is None:
        raise TomlError("%s: null has no TOML form; leave the key out" % where)
    raise TomlError("%s: %r has no TOML form" % (where, value))


def is_table_list(value):
    return isinstance(value, list) and value and all(isinstance(v, dict) for v in value)


def render_table(table, path, lines):
    """Appends `table` (a dict) as TOML: its plain keys, then sub-tables,
    then arrays of tables, in the order given."""
    plain = [(k, v) for k, v in table.items() if not isinstance(v, dict) and not is_table_list(v)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
    arrays = [(k, v) for k, v in table.items() if is_table_list(v)]
    for key, value in plain:
        lines.append("%s = %s" % (toml_key(key), toml_value(value, ".".join(path + [str(key)]))))
    for key, value in tables:
        sub = path + [str(key)]
        lines.append("")
        lines.append("[%s]" % ".".join(toml_key(k) for k in sub))
        render_table(value, sub, lines)
    for key, values in arrays:
        sub = path + [str(key)]
        for value in values:
            lines.append("")
            lines.append("[[%s]]" % ".".join(toml_key(k) for k in sub))
            render_table(value, sub, lines)


def render_definition(definition):
    lines = ["# Managed by Ansible (rmachines.core.machine); local edits are replaced."]
    render_table(definition, [], lines)
    return "\n".join(lines) + "\n"


class Rmachinectl:
    def __init__(self, module):
        self.module = module
        self.program = module.get_bin_path(module.params["rmachinectl"], required=True)

    def run(self, *args):
        rc, out, err = self.module.run_command([self.program] + list(args))
        if rc != 0:
            message = err.strip() or out.strip() or "rmachinectl %s exited with %d" % (args[0], rc)
            lines = [line[len("rmachinectl: "):] if line.startswith("rmachinectl: ") else line
                     for line in message.splitlines()]
            self.module.fail_json(msg="; ".join(lines), rc=rc, command=" ".join(args))
        return out

    def machines(self):
        out = self.run("list", "--json")
        try:
            return dict((m["name"], m) for m in json.loads(out))
        except (ValueError, KeyError, TypeError) as error:
            self.module.fail_json(msg="rmachinectl list --json printed something else: %s" % error)


def definition_error(machine):
    """rmachined's error about the machine's definition file (it names the
    file, line and key), or None."""
    error = str(machine.get("error") or "")
    file = str(machine.get("definition") or "")
    if error and file and error.startswith(file):
        return error
    return None


def write_atomically(path, text):
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            definition=dict(type="dict"),
            image=dict(type="str"),
            state=dict(type="str", default="present",
                       choices=["present", "absent", "started", "stopped", "restarted"]),
            restart_on_change=dict(type="bool", default=False),
            config_dir=dict(type="path", default="/etc/rmachines"),
            rmachinectl=dict(type="str", default="rmachinectl"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    name = params["name"]
    state = params["state"]
    if not NAME_PATTERN.match(name) or ".." in name:
        module.fail_json(msg="%r is not a machine name ([a-z0-9][a-z0-9.-]{0,63}, no '..')" % name)
    path = os.path.join(params["config_dir"], name + ".toml")
    result = dict(changed=False, definition_path=path, machine={})

    desired = None
    if state != "absent" and (params["definition"] is not None or params["image"] is not None):
        definition = dict(params["definition"] or {})
        if params["image"] is not None:
            if "root" in definition or "image" in definition:
                module.fail_json(msg="give image or a definition with root/image, not both")
            definition = dict([("image", params["image"])] + list(definition.items()))
        try:
            desired = render_definition(definition)
        except TomlError as error:
            module.fail_json(msg="definition of %s: %s" % (name, error))

    try:
        with open(path) as handle:
            current = handle.read()
    except FileNotFoundError:
        current = None
    except OSError as error:
        module.fail_json(msg="cannot read %s: %s" % (path, error))

    ctl = Rmachinectl(module)
    machines = ctl.machines()
    machine = machines.get(name)
    running = machine is not None and machine.get("state") in ACTIVE_STATES

    if state == "absent":
        if running:
            result["changed"] = True
            if not module.check_mode:
                ctl.run("stop", name)
        if current is not None:
            result["changed"] = True
            if module._diff:
                result["diff"] = dict(before=current, after="", before_header=path, after_header=path)
            if not module.check_mode:
                try:
                    os.unlink(path)
                except OSError as error:
                    module.fail_json(msg="cannot remove %s: %s" % (path, error))
                ctl.run("reload")
        if not module.check_mode and ctl.machines().get(name):
            module.fail_json(msg="rmachined still lists %s after its definition %s was removed; "
                             "is config_dir its --config-dir?" % (name, path))
        module.exit_json(**result)

    definition_changed = desired is not None and desired != current
    if definition_changed:
        result["changed"] = True
        if module._diff:
            result["diff"] = dict(before=current or "", after=desired,
                                  before_header=path, after_header=path)
        if not module.check_mode:
            try:
                if not os.path.isdir(params["config_dir"]):
                    os.makedirs(params["config_dir"], 0o755)
                write_atomically(path, desired)
            except OSError as error:
                module.fail_json(msg="cannot write %s: %s" % (path, error))
            ctl.run("reload")
            machine = ctl.machines().get(name)
            if machine is None:
                module.fail_json(msg="rmachined did not load %s from %s; is config_dir its "
                                 "--config-dir?" % (name, path))
            error = definition_error(machine)
            if error:
                # Refused: the previous file comes back, so that a running
                # machine can start again as it was.
                try:
                    if current is None:
                        os.unlink(path)
                    else:
                        write_atomically(path, current)
                except OSError as restore_error:
                    error += " (and restoring %s failed: %s)" % (path, restore_error)
                ctl.run("reload")
                module.fail_json(msg=error, definition_path=path)
    elif machine is None and not (module.check_mode and desired is not None):
        module.fail_json(msg="no machine %s: rmachined has no definition of it (give "
                         "definition or image)" % name)
    elif machine is not None and definition_error(machine):
        module.fail_json(msg=definition_error(machine), definition_path=path)

    if state == "started" and running and definition_changed and params["restart_on_change"]:
        state = "restarted"
    if state == "started" and not running:
        result["changed"] = True
        if not module.check_mode:
            ctl.run("start", name)
    elif state == "stopped" and running:
        result["changed"] = True
        if not module.check_mode:
            ctl.run("stop", name)
    elif state == "restarted":
        result["changed"] = True
        if not module.check_mode:
            ctl.run("restart", name)

    if not module.check_mode:
        machine = ctl.machines().get(name, {})
    result["machine"] = machine or {}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
