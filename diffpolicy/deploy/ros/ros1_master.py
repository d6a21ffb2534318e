"""Surviving a ROS 1 master restart: watch the master, re-register this node with a new one.

rospy registers a node's publishers, subscribers and services with the master once, at creation.
When the master dies, connections already made between nodes keep working (they are peer to
peer), but no new one can be made; a master started again on the same URI knows nothing, and
rospy never registers again by itself, so no node started afterwards would ever find this one.

    watch = MasterWatch(rosgraph.get_master_uri())   # after rospy.init_node; polls in a thread
    watch.connected                                  # False from the first failed poll until re-registered
    watch.reconnections                              # times this node re-registered with a master
    watch.close()

Every `poll_s` the watch calls the master's `getPid`. A call that fails (refused, timed out) marks
the master lost. When a master answers again, or answers with another PID (a restart between two
polls), the watch registers every publication, subscription and service of this node with it and
passes each subscription's publishers to this node's own `publisherUpdate` (what a master does),
so connections to publishers that registered first are made.
"""

from __future__ import annotations

import http.client
import logging
import threading
import xmlrpc.client

import rospy
from rospy.impl.registration import get_service_manager, get_topic_manager

from diffpolicy.deploy.errors import BridgeError

LOG = logging.getLogger(__name__)
# unreachable, a connection dropped mid-reply, a malformed reply, a refused call
MASTER_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.Error, ValueError, TypeError, BridgeError)


class TimeoutTransport(xmlrpc.client.Transport):
    """An XML-RPC transport whose connections give up after `timeout` seconds (a hung master)."""

    def __init__(self, timeout: float):
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host):
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


def proxy(uri: str, timeout: float) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(uri, transport=TimeoutTransport(timeout))


def checked(reply: list, call: str, where: str):
    """The value of a ROS XML-RPC reply `[code, status, value]`; `BridgeError` unless code is 1."""
    code, status, value = reply
    if code != 1:
        raise BridgeError(f"{where} refused {call}: code {code}, {status!r}")
    return value


def register_all(master_uri: str, timeout: float) -> int:
    """Registers this node's publications, subscriptions and services with the master at
    `master_uri`; returns how many. Raises `MASTER_ERRORS` if the master fails meanwhile."""
    caller_id, node_uri = rospy.get_caller_id(), rospy.core.get_node_uri()
    master, node = proxy(master_uri, timeout), proxy(node_uri, timeout)
    where = f"ROS master at {master_uri}"
    topics, services = get_topic_manager(), get_service_manager()
    with topics.lock:  # rospy adds topics under this lock; snapshot, then talk to the master outside it
        publications, subscriptions = topics.get_publications(), topics.get_subscriptions()
    for name, kind in publications:
        checked(master.registerPublisher(caller_id, name, kind, node_uri), f"registerPublisher {name}", where)
    for name, kind in subscriptions:
        publishers = checked(master.registerSubscriber(caller_id, name, kind, node_uri), f"registerSubscriber {name}",
                             where)
        checked(node.publisherUpdate("/master", name, publishers), f"publisherUpdate {name}", f"this node ({node_uri})")
    services_now = services.get_services()
    for name, service_uri in services_now:
        checked(master.registerService(caller_id, name, service_uri, node_uri), f"registerService {name}", where)
    return len(publications) + len(subscriptions) + len(services_now)


class MasterWatch:
    """Polls the master and re-registers with a restarted one (module docstring)."""

    def __init__(self, master_uri: str, poll_s: float = 0.5, timeout_s: float = 2.0):
        self.master_uri, self.poll_s, self.timeout_s = master_uri, poll_s, timeout_s
        self.master = proxy(master_uri, timeout_s)
        try:
            self.pid = self._pid()  # rospy.init_node has just registered with this master
        except MASTER_ERRORS as err:
            raise BridgeError(f"ROS master at {master_uri} did not answer getPid after registering this node: "
                              f"{err}") from None
        self.connected = True
        self.reconnections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ros1-master-watch", daemon=True)
        self._thread.start()

    def _pid(self) -> int:
        return checked(self.master.getPid(rospy.get_caller_id()), "getPid", f"ROS master at {self.master_uri}")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """One check of the master; re-registers if it came back or changed."""
        try:
            pid = self._pid()
            if self.connected and pid == self.pid:
                return
            count = register_all(self.master_uri, self.timeout_s)
        except MASTER_ERRORS as err:
            if self.connected:
                LOG.warning("ROS master at %s lost (%s); holding until it is back", self.master_uri, err)
            self.connected = False
            return
        self.pid, self.connected = pid, True
        self.reconnections += 1
        LOG.warning("ROS master at %s is back (pid %d): re-registered %d topics and services", self.master_uri, pid,
                    count)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + self.poll_s)
