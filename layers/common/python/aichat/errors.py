"""The one error type the services raise, and the contract's codes with their HTTP status and message."""

from __future__ import annotations

# code -> (HTTP status, default Chinese message). The first block is the contract's table (section 2.6
# and the endpoint references); the rest are documented extensions (README, docs/openapi.yaml).
CATALOG: dict[str, tuple[int, str]] = {
    "InvalidInput": (400, "缺少必填参数或参数格式不正确"),
    "InvalidPhoneNumber": (400, "手机号格式不合法"),
    "InvalidVerifyCode": (400, "验证码格式不合法"),
    "VerifyFailed": (401, "验证码错误或已过期"),
    "Unauthorized": (401, "JWT 缺失、无效、过期或用户不存在"),
    "RoleNotFound": (404, "role_code 不存在"),
    "InvalidImage": (400, "图片 base64 非法"),
    "MissingApiKey": (500, "大模型 API Key 未配置"),
    "MissingDatabaseConfig": (500, "数据库配置缺失"),
    "DatabaseError": (500, "数据库异常"),
    "UpstreamHTTPError": (502, "上游模型 HTTP 错误"),
    "NetworkError": (502, "网络异常"),
    "InternalError": (500, "服务内部异常"),
    "SendCodeFailed": (500, "短信平台返回失败"),
    # Extensions.
    "RateLimited": (429, "请求过于频繁，请稍后再试"),
    "NotFound": (404, "接口不存在"),
    "MethodNotAllowed": (405, "请求方法不被允许"),
    "PayloadTooLarge": (413, "请求体过大"),
    "MessageNotFound": (404, "消息不存在"),
    "ConversationNotFound": (404, "会话不存在"),
    "UnsupportedMediaType": (415, "请求体必须是 application/json"),
    "SkillNotFound": (404, "该角色没有这个技能，或技能暂不可用"),
    "ToolNotFound": (404, "工具不存在或未配置"),
    "ToolFailed": (502, "工具调用失败"),
    "AccountExists": (409, "账号已存在"),
    "InvalidCredentials": (401, "账号或密码错误"),
    "SessionNotFound": (404, "会话不存在"),
    "RequestInProgress": (409, "同一请求正在处理中，请稍后再试"),
    "IdempotencyKeyReused": (422, "该幂等键已用于另一个请求"),
}


class ApiError(Exception):
    """An error answered to the client as the contract's error JSON."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        default_status, default_message = CATALOG[code]
        self.code = code
        self.status = status or default_status
        self.message = message or default_message
        self.retry_after = retry_after
        super().__init__(f"{self.status} {code}: {self.message}")

    def body(self) -> dict[str, object]:
        """The contract's error body."""
        return {"success": False, "code": self.code, "message": self.message}
