"""The ROS bridge: one transport interface (`transport`) over ROS 1 (`ros1`, rospy) and ROS 2 wire
types on Cyclone DDS (`dds`, `ros2_types`); the bridge loop (`bridge`), its configuration
(`config`, `deploy/bridge/*.yaml`) and a simulated robot behind the same topics (`simrobot`).
Each transport imports its middleware only when it is made (`transport.make_transport`)."""
