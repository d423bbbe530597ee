"""The action node's ``worldvla/run_instruction`` server (RunInstruction): a ROS adapter over the controller's
goal state machine. Requests are checked once, before acceptance; every accepted goal gets exactly one
result; the execute callback only waits for the outcome and sends feedback."""
from __future__ import annotations

import math
from typing import Any

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from worldvla.action import RunInstruction

from worldvla_ros.control import Goal
from worldvla_ros.model.prompts import normalize_instruction
from worldvla_ros.nodes.common import reliable_qos

Outcome = RunInstruction.Result


class TaskActionServer:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.latency = self.surprise_psnr = math.nan  # for the feedback
        self._goals: dict[bytes, Goal] = {}  # accepted goals whose execute callback has not taken them yet
        requests = reliable_qos(1000)  # a burst of requests is queued and answered, not dropped (default: 10)
        self.server = ActionServer(
            node, RunInstruction, 'worldvla/run_instruction', execute_callback=self._execute,
            goal_callback=node._guard(self._on_request, 'goal request', lambda: GoalResponse.REJECT),
            handle_accepted_callback=node._guard(self._on_accepted, 'goal start'),
            cancel_callback=node._guard(self._on_cancel, 'cancel request', lambda: CancelResponse.ACCEPT),
            goal_service_qos_profile=requests, cancel_service_qos_profile=requests,
            result_service_qos_profile=requests, callback_group=ReentrantCallbackGroup())

    def _on_request(self, request: RunInstruction.Goal) -> GoalResponse:
        node = self.node
        node.stats.count('goal_requests')
        try:  # the one check of the instruction, before acceptance
            if node.policy is None:
                raise ValueError('the node is not active (lifecycle)')
            node.policy.check_instruction(request.instruction)
        except ValueError as exc:
            refusal = ('goal', str(exc))
        else:
            refusal = node.controller.goal_refusal(node.clock_s(), request.time_limit)
        if refusal is not None:
            node.stats.count(f'rejected_{refusal[0]}')
            node.say('warning', f'rejected_{refusal[0]}', f'rejected ({refusal[0]}): {refusal[1]}')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _on_accepted(self, handle: ServerGoalHandle) -> None:
        r = handle.request
        goal = Goal(handle, normalize_instruction(r.instruction), int(r.max_steps), float(r.time_limit))
        if self.node.controller.start_goal(goal, self.node.clock_s()):
            self.node.say('info', 'goal', f'goal: {goal.instruction!r} (max_steps {goal.max_steps}, time_limit '
                          f'{goal.time_limit:g} s)', every=0.5)
            self.node.wake()
        self._goals[bytes(handle.goal_id.uuid)] = goal
        handle.execute()

    def _on_cancel(self, handle: ServerGoalHandle) -> CancelResponse:
        self.node.controller.cancel_goal(handle, self.node.clock_s())  # a hold from the next tick on, then the answer
        return CancelResponse.ACCEPT

    def _execute(self, handle: ServerGoalHandle) -> RunInstruction.Result:
        goal = self._goals.pop(bytes(handle.goal_id.uuid))
        feedback, sent = RunInstruction.Feedback(), None
        while not goal.done.wait(0.1):
            now = (goal.chunks, goal.steps)
            if now != sent and handle.is_active:
                feedback.chunks, feedback.commands_sent = now
                feedback.last_inference_latency, feedback.surprise_psnr = self.latency, self.surprise_psnr
                handle.publish_feedback(feedback)
                sent = now
        self.node.say('info', 'goal_end', f'goal {goal.instruction!r} ended: {goal.outcome} ({goal.message}), '
                      f'{goal.steps} steps in {goal.duration:.1f} s', every=0.5)
        if goal.outcome == 'succeeded':
            handle.succeed()
        elif goal.outcome == 'canceled' and handle.is_cancel_requested:
            handle.canceled()
        else:
            handle.abort()
        return RunInstruction.Result(outcome=getattr(Outcome, goal.outcome.upper()), message=goal.message,
                                     steps=goal.steps, duration=goal.duration)
