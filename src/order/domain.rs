//! What a valid order request is, checked before any SQL runs.

use crate::{
    error::ServiceError,
    pb,
    validate::{self, parse_id},
};

pub const MAX_PRODUCT_CHARS: usize = 200;
pub const MAX_QUANTITY: i32 = 10_000;
pub const MAX_REASON_CHARS: usize = 500;
const DEFAULT_CANCEL_REASON: &str = "cancelled at the customer's request";

/// A request to place an order, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub user_id: i64,
    pub product: String,
    pub quantity: i32,
}

impl NewOrder {
    /// Quantity 0 (unset) means 1, so the seed's `{user_id, product}` works.
    pub fn parse(request: &pb::CreateOrderRequest) -> Result<Self, ServiceError> {
        let user_id = parse_id("user_id", request.user_id)?;
        let product = validate::text("product", &request.product, MAX_PRODUCT_CHARS)?;
        let quantity = match request.quantity {
            0 => 1,
            q if (1..=MAX_QUANTITY).contains(&q) => q,
            q => {
                return Err(ServiceError::invalid(
                    "quantity",
                    format!("must be between 1 and {MAX_QUANTITY} (0 means 1), got {q}"),
                ));
            }
        };
        Ok(NewOrder { user_id, product, quantity })
    }
}

/// Why an order was cancelled: the client's words, or a default.
pub fn cancel_reason(raw: &str) -> Result<String, ServiceError> {
    if raw.trim().is_empty() {
        return Ok(DEFAULT_CANCEL_REASON.to_owned());
    }
    validate::text("reason", raw, MAX_REASON_CHARS)
}

/// The order's status as stored (a CHECK constraint keeps it to these).
pub fn status_from_db(status: &str) -> pb::OrderStatus {
    match status {
        "OPEN" => pb::OrderStatus::Open,
        "CANCELLED" => pb::OrderStatus::Cancelled,
        _ => pb::OrderStatus::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(user_id: i64, product: &str, quantity: i32) -> pb::CreateOrderRequest {
        pb::CreateOrderRequest { user_id, product: product.into(), quantity }
    }

    #[test]
    fn quantity_defaults_to_one_and_is_bounded() -> Result<(), ServiceError> {
        assert_eq!(NewOrder::parse(&request(1, "book", 0))?.quantity, 1);
        assert_eq!(NewOrder::parse(&request(1, "book", MAX_QUANTITY))?.quantity, MAX_QUANTITY);
        assert!(NewOrder::parse(&request(1, "book", -1)).is_err());
        assert!(NewOrder::parse(&request(1, "book", MAX_QUANTITY + 1)).is_err());
        Ok(())
    }

    #[test]
    fn products_are_trimmed_non_empty_and_bounded() -> Result<(), ServiceError> {
        assert_eq!(NewOrder::parse(&request(1, "  book ", 1))?.product, "book");
        assert!(NewOrder::parse(&request(1, " ", 1)).is_err());
        assert!(NewOrder::parse(&request(1, &"p".repeat(MAX_PRODUCT_CHARS + 1), 1)).is_err());
        assert!(NewOrder::parse(&request(0, "book", 1)).is_err());
        Ok(())
    }
}
