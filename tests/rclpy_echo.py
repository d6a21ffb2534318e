"""A ROS 2 node on the rclpy transport that echoes the test topics back: `python rclpy_echo.py DOMAIN`,
run by test_deploy_rclpy.py in the interpreter that has rclpy. Each message received on
/diffpolicy_test/<kind> is converted to the transport's type and published again on
/diffpolicy_test/<kind>_echo, so a round trip exercises both conversions and the wire."""

import sys
import threading

from diffpolicy.deploy.ros.transport import make_transport

transport = make_transport("rclpy", node="diffpolicy_echo", domain_id=int(sys.argv[1]))
transport.subscribe_image("/diffpolicy_test/image", transport.image_publisher("/diffpolicy_test/image_echo"))
transport.subscribe_joint_state("/diffpolicy_test/joint", transport.joint_state_publisher("/diffpolicy_test/joint_echo"))
transport.subscribe_text("/diffpolicy_test/text", transport.text_publisher("/diffpolicy_test/text_echo"))
print("echoing", flush=True)
threading.Event().wait()  # until the test stops this process by its PID
