"""Demo data for `make up` (`--seed-demo`): a payroll SaaS's support tickets, client accounts and docs."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from emulators.confluence import ConfluenceSite
from emulators.jira import JiraService
from emulators.jira_model import JiraSite
from emulators.jira_webhooks import WebhookHub
from emulators.salesforce import Org

CLIENTS: list[dict[str, Any]] = [
    {"name": "Acme Logistics", "industry": "Transportation", "revenue": 420000, "renewal_days": 45},
    {"name": "Northwind Health", "industry": "Healthcare", "revenue": 910000, "renewal_days": 120},
    {"name": "Contoso Retail", "industry": "Retail", "revenue": 260000, "renewal_days": 20},
    {"name": "Fabrikam Mining", "industry": "Mining", "revenue": 1350000, "renewal_days": 200},
]

TICKETS: list[dict[str, Any]] = [
    {"summary": "Overtime not applied after 38 hours for casual employees",
     "description": "Since the award update, casuals working more than 38 hours in a week get ordinary rates. "
                    "Pay run 2024-W14 affected for 37 employees.",
     "client": "Acme Logistics", "priority": "Blocker", "issuetype": "Bug", "components": ["Award Interpretation"],
     "labels": ["award-update", "overtime"], "age_days": 3, "idle_days": 1},
    {"summary": "Casual overtime calculated at ordinary rate",
     "description": "Casual staff over 38h/week are paid ordinary time instead of time and a half.",
     "client": "Contoso Retail", "priority": "High", "issuetype": "Bug", "components": ["Award Interpretation"],
     "labels": ["overtime"], "age_days": 2, "idle_days": 2},
    {"summary": "Payslip PDF shows leave balance as negative",
     "description": "Annual leave balance on the payslip is -3.2 days although the roster shows 4 days remaining.",
     "client": "Northwind Health", "priority": "Medium", "issuetype": "Bug", "components": ["Payslips"],
     "labels": ["leave"], "age_days": 30, "idle_days": 21, "status": "Waiting for Customer"},
    {"summary": "Night shift penalty missing for shifts crossing midnight",
     "description": "Shifts starting 22:00 and ending 06:00 get the penalty only until midnight.",
     "client": "Fabrikam Mining", "priority": "High", "issuetype": "Bug", "components": ["Award Interpretation", "Rostering"],
     "labels": ["penalty-rates"], "age_days": 12, "idle_days": 9, "status": "In Progress", "flagged": True},
    {"summary": "Single Touch Payroll submission rejected: invalid ABN",
     "description": "STP submission for pay run 2024-03-28 was rejected by the ATO with error CMN.ATO.GEN.XML03.",
     "client": "Northwind Health", "priority": "Critical", "issuetype": "Incident", "components": ["Integrations"],
     "labels": ["stp"], "age_days": 5, "idle_days": 5},
    {"summary": "Add export of timesheets to CSV",
     "description": "Managers want to export approved timesheets per cost centre to CSV.",
     "client": "Contoso Retail", "priority": "Low", "issuetype": "Story", "components": ["Timesheets"],
     "labels": ["feature-request"], "age_days": 60, "idle_days": 40},
    {"summary": "Superannuation guarantee rate not updated to 11.5%",
     "description": "Super contributions are still calculated at 11%.",
     "client": "Acme Logistics", "priority": "High", "issuetype": "Bug", "components": ["Superannuation"],
     "labels": ["super"], "age_days": 90, "idle_days": 80, "status": "Done", "resolution": "Done"},
    {"summary": "Roster publishing times out for 500+ employees",
     "description": "Publishing a fortnightly roster for the Perth depot times out after 60 seconds.",
     "client": "Fabrikam Mining", "priority": "Medium", "issuetype": "Bug", "components": ["Rostering"],
     "labels": ["performance"], "age_days": 8, "idle_days": 8},
]


def seed(jira: JiraSite, hub: WebhookHub, confluence: ConfluenceSite, salesforce: Org) -> None:
    """Load the demo data into the three emulators."""
    now = datetime.now(timezone.utc)
    items = []
    for t in TICKETS:
        created = now - timedelta(days=t["age_days"])
        updated = now - timedelta(days=t["idle_days"])
        item = {k: v for k, v in t.items() if k not in ("age_days", "idle_days")}
        item.update({"project": "SUP", "created": created.isoformat(), "updated": updated.isoformat(),
                     "reporter": "support.agent@example.com"})
        items.append(item)
    items[1]["links"] = [{"type": "Relates", "outward": "SUP-1"}]
    items[3]["links"] = [{"type": "Blocks", "inward": "SUP-8"}]
    with jira.lock:
        JiraService(jira, hub).seed(items)  # no webhooks fired: demo data predates any receiver
    with salesforce.lock:
        for c in CLIENTS:
            acct = salesforce.add("Account", {"Name": c["name"], "Industry": c["industry"], "AnnualRevenue": c["revenue"],
                                              "Type": "Customer",
                                              "Renewal_Date__c": (now + timedelta(days=c["renewal_days"])).date().isoformat()})
            salesforce.add("Case", {"Subject": f"Quarterly review: {c['name']}", "Status": "New", "Priority": "Medium",
                                    "AccountId": acct["Id"], "Origin": "Email"})
    with confluence.lock:
        confluence.add_page({"title": "Award interpretation: overtime rules", "space": "PAY",
                             "versions": [{"body": "<p>Overtime applies after 38 ordinary hours per week.</p>",
                                           "created": (now - timedelta(days=200)).isoformat(), "message": "first draft"},
                                          {"body": "<p>Overtime applies after 38 ordinary hours per week, casuals included.</p>",
                                           "created": (now - timedelta(days=100)).isoformat(), "message": "casuals"}]})
        for c in CLIENTS:
            confluence.add_page({"title": f"{c['name']} payroll configuration", "space": "CLIENTS",
                                 "labels": ["client-config"],
                                 "body": f"<p>Pay frequency: fortnightly. Award: General Retail. Client: {c['name']}.</p>",
                                 "created": (now - timedelta(days=c["renewal_days"] + 30)).isoformat()})
